"""Reliability: transport security is honoured, and secrets never reach the logs.

- TLS: the workers, the publisher, the subscriber and ``genseg submit --wait`` talk to the
  broker over TLS only (``KAFKA_SECURITY_PROTOCOL=SSL``, ``KAFKA_SSL_CAFILE``), with the
  server certificate verified (an unknown CA or a wrong host name fails). tansu 0.6.0
  cannot serve TLS itself, so stunnel terminates TLS in front of it and tansu advertises
  stunnel's address;
- SASL: tansu 0.6.0 has no SASL/PLAIN and keeps no SCRAM credentials on its memory:// or
  s3:// storage, so a SASL/PLAIN gate (tests.rel_utils.SaslGate) authenticates in front
  of it: genseg's SASL settings reach aiokafka and a real PLAIN exchange; wrong or
  missing credentials are refused;
- secrets: a worker run at DEBUG with ``KAFKA_SASL_PASSWORD`` and
  ``AWS_SECRET_ACCESS_KEY`` set (a real SASL login, a real S3 store, failures included)
  never prints them; nor does a worker whose login fails.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.subscriber import Subscriber
from plumbing.broker import BrokerError, EmbeddedBroker, free_port
from plumbing.kafka import client_kwargs, ensure_topics
from plumbing.settings import Settings
from producers.client import GensegClient
from schemas import AssetReadyEvent
from tests.kafka_utils import TopicReader
from tests.rel_utils import (
    Ledger,
    SaslGate,
    Stunnel,
    TlsFiles,
    WorkerProcess,
    make_certificates,
    record_figures,
    run_cli,
    stop_all,
    stunnel_binary,
    worker_env,
)
from tests.s3_server import MotoServer
from tests.test_rel_workers import publish, tiny_prompt
from tests.toy_stage import Ping, ToyStage

FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 50}


async def connects(**kwargs: object) -> str | None:
    """None when a producer starts (bootstraps) with ``kwargs``, else the error's name."""
    producer = AIOKafkaProducer(enable_idempotence=False, request_timeout_ms=5000, **kwargs)  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(producer.start(), 15)
        return None
    except (KafkaError, OSError, TimeoutError, ssl.SSLError) as exc:
        return type(exc).__name__
    except KeyError as exc:  # aiokafka 0.14 on a SCRAM error reply ('e=unknown-user')
        return f"KeyError {exc}"
    finally:
        await producer.stop()


# --- TLS --------------------------------------------------------------------------------------


def test_tansu_tls_flags_are_refused_with_an_explanation(tmp_path: Path) -> None:
    """What EmbeddedBroker(cert=..., key=...) does with the bundled tansu: a clear error."""
    tls = make_certificates(tmp_path)
    broker = EmbeddedBroker(cert=str(tls.cert), key=str(tls.key), log_path=tmp_path / "t.log")
    try:
        broker.start(timeout=20)
    except BrokerError as exc:
        assert "cannot serve TLS" in str(exc) and "advertised" in str(exc)
        return
    finally:
        broker.stop()
    # A tansu that serves TLS: then it must refuse plaintext (and the docs need an update).
    raise AssertionError("tansu now accepts --cert and --key: update docs/reliability.md")


@pytest.fixture
def tls_broker(tmp_path: Path) -> tuple[EmbeddedBroker, Stunnel, TlsFiles]:
    if stunnel_binary() is None:
        pytest.fail("stunnel is not installed: run `apt-get install -y stunnel4`")
    tls = make_certificates(tmp_path / "tls")
    broker_port = free_port()
    tunnel = Stunnel(tls, broker_port, tmp_path)
    broker = EmbeddedBroker(
        port=broker_port,
        advertised=f"127.0.0.1:{tunnel.port}",
        log_path=tmp_path / "tansu.log",
    )
    broker.start()
    try:
        tunnel.start()
    except BaseException:
        broker.stop()
        raise
    yield broker, tunnel, tls
    tunnel.stop()
    broker.stop()


@pytest.mark.slow
async def test_pipeline_over_tls_with_verified_certificates(
    tls_broker: tuple[EmbeddedBroker, Stunnel, TlsFiles], tmp_path: Path
) -> None:
    _, tunnel, tls = tls_broker
    bootstrap = f"127.0.0.1:{tunnel.port}"
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(tls.ca),
        topic_prefix="tls",
        blob_url=str(tmp_path / "blobs"),
        models="tiny",
    )
    # The settings build a verifying TLS context...
    assert (await connects(**settings.kafka_kwargs())) is None
    # ... and verification is real: an unknown CA, a name the certificate does not carry,
    # or plaintext on the TLS port all fail.
    other = settings.model_copy(update={"kafka_ssl_cafile": str(tls.other_ca)})
    assert (await connects(**other.kafka_kwargs())) is not None
    wrong_name = settings.model_copy(update={"kafka_bootstrap_servers": f"localhost:{tunnel.port}"})
    assert (await connects(**wrong_name.kafka_kwargs())) is not None
    assert (await connects(bootstrap_servers=bootstrap)) is not None

    await ensure_topics(settings, partitions=2)
    env = worker_env(settings)
    gen = WorkerProcess("gen", env, tmp_path)
    seg = WorkerProcess("seg", env, tmp_path)
    ids = [f"tls-{i}" for i in range(6)]
    try:
        gen.start()
        seg.start()
        await asyncio.gather(gen.wait_assigned(), seg.wait_assigned())
        # publisher + subscriber APIs
        async with Subscriber(settings, ("assets", "dlq")) as sub:
            async with GensegClient(settings) as client:
                await client.publisher.publish(settings.topics.prompts, tiny_prompt(ids[0], 0, 2))
            (outcome,) = await sub.wait_for(ids[0], timeout=120)
        assert isinstance(outcome, AssetReadyEvent), outcome
        await publish(settings, [tiny_prompt(i, n, 2) for n, i in enumerate(ids[1:-1], 1)])
        # the CLI, configured from the environment only
        submitted = await run_cli(
            ["submit", "a cup", "--target", "cup", "--id", ids[-1], "--width", "64",
             "--height", "64", "--steps", "2", "--wait", "--timeout", "120"],
            env,
            timeout=180,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        async with Ledger(settings) as ledger:
            await ledger.until_done(ids, timeout=120)
        verdict = ledger.verdict(ids)
    finally:
        stop_all([gen, seg])
    accepted = tunnel.log_text().count("accepted connection from")
    record_figures(
        "tls",
        tls_connections=accepted,
        refused=["unknown CA", "host name mismatch", "plaintext"],
        **verdict.figures(),
    )
    verdict.assert_exactly_once()
    assert accepted >= 6, "every client came through the TLS terminator"


# --- SASL -------------------------------------------------------------------------------------


@pytest.fixture
def sasl_broker(tmp_path: Path) -> tuple[EmbeddedBroker, SaslGate, str]:
    password = f"sasl-{secrets.token_hex(12)}"
    broker_port = free_port()
    gate = SaslGate(broker_port, users={"genseg": password})
    broker = EmbeddedBroker(
        port=broker_port, advertised=f"127.0.0.1:{gate.port}", log_path=tmp_path / "tansu.log"
    )
    broker.start()
    gate.start()
    yield broker, gate, password
    gate.stop()
    broker.stop()


def test_sasl_settings_map_to_aiokafka_and_stay_secret() -> None:
    settings = Settings(
        kafka_bootstrap_servers="broker:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="genseg",
        kafka_sasl_password="s3cr3t-value",  # type: ignore[arg-type]
        kafka_ssl_check_hostname=False,
    )
    kwargs = settings.kafka_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "genseg"
    assert kwargs["sasl_plain_password"] == "s3cr3t-value"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["ssl_context"].check_hostname is False
    assert "s3cr3t-value" not in repr(settings) and "s3cr3t-value" not in str(settings)
    assert "s3cr3t-value" not in settings.model_dump_json()


async def test_tansu_authentication_offers_no_plain_and_no_scram_users(tmp_path: Path) -> None:
    """Pins the limitation documented in docs/reliability.md: with ``--authentication``,
    tansu 0.6.0 on memory storage refuses PLAIN and every SCRAM login."""

    class Authenticating(EmbeddedBroker):
        def command(self) -> list[str]:
            return [*super().command(), "--authentication"]

    broker = Authenticating(log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        for mechanism in ("PLAIN", "SCRAM-SHA-512"):
            error = await connects(
                bootstrap_servers=broker.bootstrap_servers,
                security_protocol="SASL_PLAINTEXT",
                sasl_mechanism=mechanism,
                sasl_plain_username="genseg",
                sasl_plain_password="anything",
            )
            assert error is not None, f"tansu now accepts {mechanism}: update the docs"
    finally:
        broker.stop()


async def test_runtime_publisher_and_subscriber_authenticate_with_sasl_plain(
    sasl_broker: tuple[EmbeddedBroker, SaslGate, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, gate, password = sasl_broker
    caplog.set_level(logging.DEBUG)  # every logger, aiokafka's included
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{gate.port}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="genseg",
        kafka_sasl_password=password,  # type: ignore[arg-type]
        topic_prefix="sasl",
        blob_url=str(tmp_path / "blobs"),
    )
    wrong = settings.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
    # Client options made the way every genseg client gets them (plumbing.kafka), which
    # also registers the password for redaction.
    assert await connects(**client_kwargs(wrong)) is not None
    assert await connects(bootstrap_servers=settings.kafka_bootstrap_servers) is not None
    await ensure_topics(settings, partitions=2)
    ids = [f"p{i}" for i in range(20)]
    async with StageRuntime(ToyStage(), settings, RuntimeConfig(**FAST)):
        async with Subscriber(settings, ("dlq",)) as sub:
            async with GensegClient(settings) as client:
                for i in ids:
                    await client.publisher.publish(settings.topics.prompts, Ping(id=i))
                await client.publisher.send(
                    settings.topics.prompts, b"not json", key="bad-one", headers=[]
                )
            (dead,) = await sub.wait_for("bad-one", timeout=60)
        async with TopicReader(settings, "images", unchecked=["images"]) as reader:
            await reader.until(lambda: set(ids) <= set(reader.keys("images")), timeout=60)
    assert dead.error.type == "validation"
    assert "Received cluster metadata" in caplog.text or "SASL" in caplog.text, "DEBUG was on"
    assert password not in caplog.text and "not-the-password" not in caplog.text
    accepted = [u for u, ok in gate.logins if ok]
    refused = [u for u, ok in gate.logins if not ok]
    record_figures(
        "sasl",
        logins_accepted=len(accepted),
        logins_refused=len(refused),
        unauthenticated_requests_refused=gate.refused_before_auth,
    )
    assert len(accepted) >= 4, "runtime consumer, producer, publisher, reader all logged in"
    assert set(accepted) == {"genseg"}
    assert refused == ["genseg"], "the wrong password was refused"
    assert gate.refused_before_auth >= 1, "a client without SASL was refused"


# --- secrets in logs ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_secrets_never_appear_in_debug_logs(
    sasl_broker: tuple[EmbeddedBroker, SaslGate, str], tmp_path: Path
) -> None:
    _, gate, sasl_password = sasl_broker
    aws_secret = f"aws-{secrets.token_hex(16)}"
    with MotoServer() as moto:  # moto takes any secret key: the value is ours to pick
        bucket = moto.create_bucket("secrets")
        settings = Settings(
            kafka_bootstrap_servers=f"127.0.0.1:{gate.port}",
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="genseg",
            kafka_sasl_password=sasl_password,  # type: ignore[arg-type]
            topic_prefix="secrets",
            blob_url=f"s3://{bucket}/genseg",
        )
        await ensure_topics(settings, partitions=1)
        env = worker_env(
            settings,
            **{**moto.obstore_env(), "AWS_SECRET_ACCESS_KEY": aws_secret},
            KAFKA_SASL_MECHANISM="PLAIN",
            KAFKA_SASL_USERNAME="genseg",
            KAFKA_SASL_PASSWORD=sasl_password,
            GENSEG_LOG_LEVEL="DEBUG",
        )
        gen = WorkerProcess("gen", env, tmp_path)
        wrong_password = f"wrong-{secrets.token_hex(8)}"
        locked_out = WorkerProcess(
            "seg", {**env, "KAFKA_SASL_PASSWORD": wrong_password}, tmp_path, name="locked-out"
        )
        try:
            gen.start()
            locked_out.start()
            await gen.wait_assigned()
            good = tiny_prompt("secret-ok", 1, 1)
            missing = tiny_prompt("secret-missing", 2, 1)
            async with Ledger(settings) as ledger:
                await publish(settings, [good])
                await ledger.until(lambda: "secret-ok" in ledger.keys("images"), timeout=60)
                moto.stop()  # store failures: retries, warnings, a dead letter
                await publish(settings, [missing])
                await ledger.until(lambda: "secret-missing" in ledger.keys("dlq"), timeout=90)
                records = b"".join(
                    (r.value or b"") + b"".join(v for _, v in r.headers)
                    for rs in ledger.records.values()
                    for r in rs
                )
            deadline = time.monotonic() + 60
            while locked_out.alive:  # it cannot log in: it must give up and say so
                assert time.monotonic() < deadline, "a worker with a wrong password kept running"
                await asyncio.sleep(0.2)
        finally:
            stop_all([gen, locked_out])
    logs = {w.name: w.log() for w in (gen, locked_out)}
    found = [
        (name, secret[:5])
        for secret in (sasl_password, aws_secret, wrong_password)
        for name, text in [*logs.items(), ("records", records.decode("utf-8", "replace"))]
        if secret in text
    ]
    record_figures(
        "secrets",
        log_bytes={name: len(text) for name, text in logs.items()},
        debug_lines=logs["gen"].count("DEBUG"),
        record_bytes_searched=len(records),
        secrets_found=len(found),
    )
    assert "DEBUG" in logs["gen"], "the worker logged at DEBUG"
    assert "could not write" in logs["gen"], "the store failure was logged"
    assert locked_out.proc is not None and locked_out.proc.returncode != 0
    assert "genseg" in logs["locked-out"] or "Authentication" in logs["locked-out"]
    assert not found, f"secrets printed: {found}"
