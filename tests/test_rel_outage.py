"""Reliability: the broker or the object store goes away mid-run and comes back.

- broker: tansu with durable ``s3://`` storage on a loopback moto S3 server is stopped
  for 10 s while requests are in flight, then started again on the same port; the
  workers reconnect by themselves and no request is lost;
- object store: the workers' S3 blob store (moto) is stopped; the requests that meet
  the outage are retried with backoff, then dead-lettered with the reason; the workers
  keep running and keep their Kafka positions; once the store is back,
  ``genseg dlq replay`` finishes them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from plumbing.blobstore import BlobStore
from plumbing.broker import EmbeddedBroker, kafka_api_versions_ok
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from schemas import BlobRef
from tests.kafka_utils import committed_offsets
from tests.rel_utils import (
    Ledger,
    WorkerProcess,
    blob_refs_of_asset,
    record_figures,
    run_cli,
    stop_all,
    worker_env,
)
from tests.s3_server import MotoServer
from tests.test_rel_workers import publish, tiny_prompt

OUTAGE_S = 10.0
_prefixes = itertools.count()


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**settings.kafka_kwargs())
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


@pytest.mark.slow
async def test_broker_outage_of_10_s_loses_nothing_and_workers_reconnect(
    moto: MotoServer, tmp_path: Path
) -> None:
    bucket = moto.create_bucket("tansu")
    broker = EmbeddedBroker(
        storage=f"s3://{bucket}/", env=moto.tansu_env(), log_path=tmp_path / "tansu-1.log"
    )
    broker.start()
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"outage{os.getpid()}-{next(_prefixes)}",
        blob_url=str(tmp_path / "blobs"),
        models="tiny",
    )
    restarted: EmbeddedBroker | None = None
    env = worker_env(settings)
    gen = WorkerProcess("gen", env, tmp_path)
    seg = WorkerProcess("seg", env, tmp_path)
    ids = [f"bo-{i:03d}" for i in range(120)]
    try:
        await ensure_topics(settings, partitions=4)
        gen.start()
        seg.start()
        await asyncio.gather(gen.wait_assigned(), seg.wait_assigned())
        async with Ledger(settings) as ledger:
            await publish(settings, [tiny_prompt(i, n, 2 + n % 3) for n, i in enumerate(ids)])
            await ledger.until(lambda: ledger.distinct_assets() >= 25, timeout=120)
            in_flight = len(ids) - ledger.distinct_assets()
            broker.kill()  # mid-run: requests in every stage
            assert not kafka_api_versions_ok(broker.host, broker.port)
            down_at = time.monotonic()
            # The outage itself lasts OUTAGE_S; the workers must stay up all along.
            while time.monotonic() - down_at < OUTAGE_S:
                gen.check_alive()
                seg.check_alive()
                await asyncio.sleep(0.2)
            restarted = EmbeddedBroker(
                port=broker.port,
                storage=f"s3://{bucket}/",
                env=moto.tansu_env(),
                log_path=tmp_path / "tansu-2.log",
            )
            restarted.start()
            outage = time.monotonic() - down_at
            back_at = time.monotonic()
            await ledger.until_done(ids, timeout=240)
            recovered_after = time.monotonic() - back_at
            for worker in (gen, seg):
                worker.check_alive()
        verdict = ledger.verdict(ids)
    finally:
        stop_all([gen, seg])
        broker.stop()
        if restarted is not None:
            restarted.stop()
    store = BlobStore.from_url(settings.blob_url)
    for event in {e["id"]: e for e in ledger.values("assets")}.values():
        for ref in blob_refs_of_asset(event):
            store.get(BlobRef.model_validate(ref))
    record_figures(
        "broker_outage",
        outage_s=round(outage, 1),
        in_flight_at_outage=in_flight,
        all_done_after_restart_s=round(recovered_after, 1),
        worker_restarts=gen.starts + seg.starts - 2,
        **verdict.figures(),
    )
    assert gen.starts == seg.starts == 1, "the workers were never restarted"
    verdict.assert_exactly_once()
    assert verdict.assets == len(ids)


@pytest.mark.slow
async def test_object_store_outage_dead_letters_with_reason_then_replay_finishes(
    moto: MotoServer, settings: Settings, tmp_path: Path
) -> None:
    bucket = moto.create_bucket("blobs")
    settings = settings.model_copy(update={"blob_url": f"s3://{bucket}/genseg"})
    env = worker_env(settings, **moto.obstore_env())
    gen = WorkerProcess("gen", env, tmp_path)
    seg = WorkerProcess("seg", env, tmp_path)
    wave1 = [f"s3a-{i:02d}" for i in range(16)]
    wave2 = [f"s3b-{i:02d}" for i in range(12)]
    group = f"{settings.topic_prefix}.gen"
    try:
        await ensure_topics(settings, partitions=4)
        gen.start()
        seg.start()
        await asyncio.gather(gen.wait_assigned(), seg.wait_assigned())
        async with Ledger(settings) as ledger:
            await publish(settings, [tiny_prompt(i, n, 2) for n, i in enumerate(wave1)])
            await ledger.until_done(wave1, timeout=120)
            assert set(ledger.keys("assets")) >= set(wave1), "the healthy store works"

            moto.stop()  # the object store goes away, the workers stay
            down_at = time.monotonic()
            await publish(settings, [tiny_prompt(i, 100 + n, 2) for n, i in enumerate(wave2)])
            await ledger.until_done(wave2, timeout=180)
            dead_after = time.monotonic() - down_at
            dead = {d["id"]: d for d in ledger.values("dlq")}
            for worker in (gen, seg):
                worker.check_alive()
            # The consumer group moved past every prompt (dead letters are terminal).
            ends = await end_offsets(settings, settings.topics.prompts)
            await wait_until_committed(settings, group, ends)

            moto.start()  # back on the same port, empty (moto keeps its data in memory)
            moto.client().create_bucket(Bucket=bucket)
            replay = await run_cli(["dlq", "replay"], env)
            assert replay.returncode == 0, replay.stdout + replay.stderr
            await ledger.until(lambda: set(ledger.keys("assets")) >= set(wave2), timeout=180)
            for worker in (gen, seg):
                worker.check_alive()
        assets = ledger.values("assets")
        gen_log = gen.log()
    finally:
        stop_all([gen, seg])
    retry_lines = re.findall(
        r"stage gen: blob_unavailable on b'(s3b-\d+)', retry (\d) in (\d+) ms", gen_log
    )
    backoffs = sorted({(int(n), int(ms)) for _, n, ms in retry_lines})
    record_figures(
        "object_store_outage",
        healthy_requests=len(wave1),
        requests_during_outage=len(wave2),
        dead_lettered=len(set(dead) & set(wave2)),
        dead_lettered_within_s=round(dead_after, 1),
        backoff_steps_ms=[ms for _, ms in backoffs],
        replayed=_replayed_count(replay.stdout),
        completed_after_replay=len(set(e["id"] for e in assets) & set(wave2)),
        lost=len(set(wave1 + wave2) - {e["id"] for e in assets}),
        worker_restarts=gen.starts + seg.starts - 2,
    )
    assert gen.starts == seg.starts == 1
    assert set(dead) == set(wave2), "exactly the requests that met the outage dead-lettered"
    for request_id in wave2:
        d = dead[request_id]
        assert d["stage"] == "gen" and d["error"]["type"] == "blob_unavailable", d
        assert d["attempts"] == 3, d  # retried before giving up
        assert f"could not write s3://{bucket}/genseg/{request_id}/0/gen/" in d["error"]["message"]
    assert backoffs == [(1, 200), (2, 400)], "exponential backoff between the attempts"
    for request_id in wave2:  # each request waited 200 ms, then 400 ms
        steps = {(int(n), int(ms)) for rid, n, ms in retry_lines if rid == request_id}
        assert steps == {(1, 200), (2, 400)}, (request_id, steps)
    assert _replayed_count(replay.stdout) == len(wave2), replay.stdout
    counts = {rid: [e["id"] for e in assets].count(rid) for rid in wave1 + wave2}
    assert all(n == 1 for n in counts.values()), f"no request ran twice: {counts}"
    with _env(moto.obstore_env()):
        store = BlobStore.from_url(settings.blob_url)
        for event in assets:
            if event["id"] in wave2:  # written after the store came back
                for ref in blob_refs_of_asset(event):
                    store.get(BlobRef.model_validate(ref))


async def wait_until_committed(settings: Settings, group: str, ends: dict[int, int]) -> None:
    latest: dict[int, int | None] = {}

    async def check() -> bool:
        latest.update(await committed_offsets(settings, group, settings.topics.prompts, len(ends)))
        return all((latest.get(p) or 0) >= end for p, end in ends.items())

    deadline = time.monotonic() + 30
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"group {group} committed {latest}, end offsets {ends}")
        await asyncio.sleep(0.2)


def _replayed_count(stdout: str) -> int | None:
    match = re.search(r"replayed (\d+), skipped (\d+)", stdout)
    return int(match.group(1)) if match else None


class _env:
    """Set environment variables for the duration of a ``with`` block."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
