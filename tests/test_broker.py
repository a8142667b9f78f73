"""The embedded broker launcher (tansu) and topic administration, against real processes."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from plumbing.broker import BrokerError, EmbeddedBroker, free_port, kafka_api_versions_ok
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from tests.s3_server import MotoServer

Record = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]


async def _produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=list(headers))
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[Record]:
    """Read ``count`` records of ``topic`` from the beginning; fail after ``timeout`` seconds."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count:
            assert time.monotonic() < deadline, f"only {len(got)} of {count} records arrived"
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                got += [(r.key, r.value, tuple(r.headers)) for r in batch]
    finally:
        await consumer.stop()
    return got


def _records(n: int) -> list[Record]:
    return [
        (
            f"req-{i}".encode(),
            f'{{"id": "req-{i}"}}'.encode(),
            (("traceparent", f"00-{i:032x}-{i:016x}-01".encode()),),
        )
        for i in range(n)
    ]


def _topic() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


# --- process life cycle ----------------------------------------------------------------------


def test_starts_on_a_free_port_answers_and_stops(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    assert broker.port > 0 and not broker.running
    broker.start()
    try:
        proc = broker._proc
        assert proc is not None and broker.running and broker.pid == proc.pid
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        assert kafka_api_versions_ok("127.0.0.1", broker.port)
        broker.start()  # already running: a no-op
        assert broker._proc is proc
    finally:
        broker.stop()
    assert proc.poll() is not None  # the process is gone, and reaped
    assert not broker.running and broker.pid is None
    assert not kafka_api_versions_ok("127.0.0.1", broker.port)
    broker.stop()  # idempotent


def test_context_manager_and_kill(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        proc = broker._proc
        assert proc is not None and broker.running
        broker.kill()
        assert proc.poll() == -9
        assert not broker.running
        # A new broker can take the port over right away.
        broker.start()
        assert kafka_api_versions_ok(broker.host, broker.port)
        proc = broker._proc
    assert proc is not None and proc.poll() is not None


def test_a_second_broker_on_a_port_in_use_fails(broker: EmbeddedBroker, tmp_path: Path) -> None:
    second = EmbeddedBroker(port=broker.port, log_path=tmp_path / "second.log")
    started = time.monotonic()
    with pytest.raises(BrokerError) as info:
        second.start(timeout=20)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert broker.bootstrap_servers in message
    assert "in use" in message
    assert not second.running
    assert broker.running and kafka_api_versions_ok(broker.host, broker.port)


def test_a_broker_that_exits_at_start_reports_its_log(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    bad = EmbeddedBroker(storage="bogus://nowhere/", log_path=log_path)
    started = time.monotonic()
    with pytest.raises(BrokerError) as info:
        bad.start(timeout=30)
    assert time.monotonic() - started < 10  # noticed the exit, did not wait for the timeout
    message = str(info.value)
    assert "exited" in message
    assert str(log_path) in message
    assert "bogus" in message  # the log tail: tansu's own complaint
    assert "\x1b[" not in message  # without terminal colour codes
    assert not bad.running


def test_a_listener_in_the_way_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(BrokerError, match="in use"):
            EmbeddedBroker(port=port, log_path=tmp_path / "t.log").start(timeout=10)


# --- the readiness probe -----------------------------------------------------------------------


class _OneShotServer:
    """A loopback TCP server that answers every connection with ``reply`` and closes it."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"\x00\x00\x00\x02ab",  # a frame too short for a response header
        b"\xff\xff\xff\xffxxxx",  # a negative length
        b"\x00\x00\x00\x06\x00\x00\x00\x08\x00\x00",  # another correlation id
        b"\x00\x00\x00\x06\x00\x00\x00\x07\x00\x23",  # an error code
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["closed", "short", "negative", "correlation", "error", "http"],
)
def test_probe_says_no_to_what_is_not_a_kafka_broker(reply: bytes) -> None:
    server = _OneShotServer(reply)
    try:
        started = time.monotonic()
        assert kafka_api_versions_ok("127.0.0.1", server.port, timeout=2.0) is False
        assert time.monotonic() - started < 2.5
    finally:
        server.close()


def test_probe_on_a_closed_port() -> None:
    assert kafka_api_versions_ok("127.0.0.1", free_port()) is False


# --- clients through the broker -----------------------------------------------------------------


async def test_aiokafka_produces_and_consumes_with_headers(broker: EmbeddedBroker) -> None:
    topic = _topic()
    records = _records(5)
    await _produce(broker.bootstrap_servers, topic, records)
    got = await _consume(broker.bootstrap_servers, topic, 5)
    assert sorted(got) == sorted(records)


async def _partitions(settings: Settings, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def test_ensure_topics_is_idempotent(settings: Settings) -> None:
    names = [*settings.topics.all(), *settings.topics.internal()]
    created = await ensure_topics(settings, partitions=3)
    assert sorted(created) == sorted(names)
    assert await _partitions(settings, names) == dict.fromkeys(names, 3)
    assert await ensure_topics(settings, partitions=3) == []
    assert await ensure_topics(settings, partitions=5) == []  # existing topics are left alone
    assert await _partitions(settings, names) == dict.fromkeys(names, 3)


async def test_ensure_topics_creates_only_what_is_missing(settings: Settings) -> None:
    prompts = settings.topics.prompts
    assert await ensure_topics(settings, partitions=2, names=[prompts]) == [prompts]
    created = await ensure_topics(settings, partitions=4)
    everything = [*settings.topics.all(), *settings.topics.internal()]
    assert sorted(created) == sorted(set(everything) - {prompts})
    partitions = await _partitions(settings, everything)
    assert partitions[prompts] == 2
    assert {n for n, count in partitions.items() if count == 4} == set(created)


# --- durable storage -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


async def test_durable_storage_survives_a_kill(moto: MotoServer, tmp_path: Path) -> None:
    bucket = moto.create_bucket("tansu")
    storage = f"s3://{bucket}/"
    topic = _topic()
    records = _records(20)
    first = EmbeddedBroker(storage=storage, env=moto.tansu_env(), log_path=tmp_path / "1.log")
    first.start()
    try:
        await _produce(first.bootstrap_servers, topic, records)
        assert moto.client().list_objects_v2(Bucket=bucket)["KeyCount"] > 0  # it wrote to S3
    finally:
        first.kill()
    assert not kafka_api_versions_ok(first.host, first.port)
    second = EmbeddedBroker(
        port=first.port, storage=storage, env=moto.tansu_env(), log_path=tmp_path / "2.log"
    )
    second.start()
    try:
        got = await _consume(second.bootstrap_servers, topic, 20)
    finally:
        second.stop()
    assert sorted(got) == sorted(records)
