"""The webhook dispatcher on the real broker, delivering to real HTTP receivers on loopback.

In-process runtimes for the stage's behaviour (retries, rejections, refusals, outputs),
then the acceptance test: the dispatcher as a real process, SIGKILLed while deliveries
are in flight and restarted, with no outcome left undelivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from consumers.runtime import RuntimeConfig, StageRuntime
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import AssetReadyEvent, BlobRef, DeadLetterEvent, PromptEvent
from schemas.events import SourceInfo
from tests.kafka_utils import TopicReader, eventually
from tests.rel_utils import WorkerProcess, wait_until, worker_env
from tests.webhook_receiver import Answer, Received, Receiver
from webhook_worker import WEBHOOK_RUNTIME_DEFAULTS, WebhookStage, dispatcher_stages
from webhook_worker.delivery import Limits
from webhook_worker.signing import delivery_id, verify

SECRET = "dispatcher-test-secret"
FAST_LIMITS = Limits(connect_timeout_s=2.0, response_timeout_s=0.5)
FAST = {
    **WEBHOOK_RUNTIME_DEFAULTS,
    "max_attempts": 3,
    "backoff_initial_ms": 50,
    "backoff_max_ms": 200,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    "commit_interval_ms": 50,
}


def with_webhooks(settings: Settings, allow: str = "127.0.0.1") -> Settings:
    return settings.model_copy(update={"webhook_secret": SecretStr(SECRET), "webhook_allow": allow})


def asset(request_id: str, callback: str | None, image_index: int = 0) -> bytes:
    """An asset-ready record value (the image reference is never read by the dispatcher)."""
    image = BlobRef(uri=f"file:///blobs/{request_id}.png", sha256="0" * 64,
                    media_type="image/png", bytes=1)  # fmt: skip
    event = AssetReadyEvent(
        id=request_id, image_index=image_index, status="no_match", image=image,
        callback_url=callback, tenant="acme",
    )  # fmt: skip
    return event.to_json_bytes()


def dead_letter(
    request_id: str, callback: str | None, *, stage: str = "gen", offset: int = 0
) -> bytes:
    """A dead-letter record value of a prompt that failed (its value names the callback)."""
    prompt = PromptEvent.model_construct(id=request_id, prompt="a cup", callback_url=callback)
    return DeadLetterEvent.build(
        stage=stage, error_type="permanent", message="refused on purpose", attempts=1,
        source=SourceInfo(topic="genseg.prompts", partition=0, offset=offset),
        raw=prompt.to_json_bytes(), request_id=request_id,
    ).to_json_bytes()  # fmt: skip


async def publish(settings: Settings, records: list[tuple[str, str, bytes]]) -> None:
    """Publish (short topic, key, value) records and wait for their acks."""
    async with Publisher(settings) as pub:
        futures = [
            await pub.send(settings.topics.name(topic), value, key=key, headers=[])
            for topic, key, value in records
        ]
        await asyncio.gather(*futures)


def runtimes(settings: Settings, **overrides: Any) -> list[StageRuntime]:
    config = {**FAST, **overrides}
    return [
        StageRuntime(stage, settings, RuntimeConfig(**config))
        for stage in dispatcher_stages(settings, limits=FAST_LIMITS)
    ]


def processed(runtime: StageRuntime) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "genseg_records_processed_total", {"stage": runtime.stage.name}
    )
    return value or 0.0


def fail_first_attempt(status: int = 500) -> Callable[[Received], Answer]:
    """Answer ``status`` to the first request of each delivery id, 200 afterwards."""
    seen: set[str] = set()
    lock = threading.Lock()

    def answer(request: Received) -> Answer:
        with lock:
            first = request.headers["x-genseg-delivery"] not in seen
            seen.add(request.headers["x-genseg-delivery"])
        return Answer(status=status) if first else Answer(status=200)

    return answer


# --- the stage ------------------------------------------------------------------------------


def test_the_dispatcher_refuses_to_start_without_a_secret(settings: Settings) -> None:
    for secret in (None, SecretStr("")):
        unsigned = settings.model_copy(update={"webhook_secret": secret})
        for stage in dispatcher_stages(unsigned):
            with pytest.raises(ValueError, match="GENSEG_WEBHOOK_SECRET is not set"):
                stage.setup()
    stages = dispatcher_stages(with_webhooks(settings))
    assert [(s.name, s.input_topic, s.dead_letter_topic) for s in stages] == [
        ("webhook-assets", "assets", "webhooks"),
        ("webhook-dlq", "dlq", "webhooks"),
    ]
    for stage in stages:
        stage.setup()
    with pytest.raises(ValueError, match="outcome"):
        WebhookStage(settings, "progress")  # type: ignore[arg-type]


async def test_a_failed_attempt_is_retried_with_the_same_delivery_id_and_signature(
    settings: Settings,
) -> None:
    """500 on each outcome's first attempt: retried; both attempts carry the same body,
    delivery id and a valid signature; asset-ready and dead-letter outcomes alike; an
    outcome without a callback_url produces nothing."""
    settings = with_webhooks(settings)
    with Receiver(fail_first_attempt(500)) as receiver:
        records = {
            "a1": ("assets", "a1", asset("a1", receiver.url("/hooks?token=a1"))),
            "a2#1": ("assets", "a2", asset("a2", receiver.url("/hooks"), image_index=1)),
            "d1": ("dlq", "d1", dead_letter("d1", receiver.url("/failed"))),
        }
        silent = [("assets", "quiet", asset("quiet", None)), ("dlq", "q2", dead_letter("q2", None))]
        assets_rt, dlq_rt = runtimes(settings)
        async with assets_rt, dlq_rt, TopicReader(settings, "webhooks") as reader:
            await publish(settings, [*records.values(), *silent])
            await reader.until(lambda: len(reader.values("webhooks")) >= 3, timeout=60)
            await eventually(lambda: processed(assets_rt) == 3 and processed(dlq_rt) == 2)
    got: dict[str, list[Received]] = defaultdict(list)
    for request in receiver.received():
        got[request.headers["x-genseg-delivery"]].append(request)
    expected = {
        delivery_id("a1", 0): records["a1"][2],
        delivery_id("a2", 1): records["a2#1"][2],
        delivery_id("d1", None): records["d1"][2],
    }
    assert set(got) == set(expected)
    for delivery, requests in got.items():
        assert [r.answered for r in requests] == [500, 200]
        assert {r.body for r in requests} == {expected[delivery]}  # as on the topic
        assert len({r.headers["x-genseg-signature"] for r in requests}) == 1
        assert all(verify(SECRET, r.body, r.headers["x-genseg-signature"]) for r in requests)
    assert got[delivery_id("a1", 0)][0].path == "/hooks?token=a1"
    records_out = {r["delivery"]: r for r in reader.values("webhooks")}
    assert set(records_out) == set(expected)
    for record in records_out.values():
        assert record["status"] == "delivered" and record["http_status"] == 200
        assert record["attempts"] == 2 and record["host"] == "127.0.0.1"
    assert records_out[delivery_id("a1", 0)]["tenant"] == "acme"
    assert records_out[delivery_id("d1", None)]["outcome"] == "dead_letter"
    assert sorted(reader.keys("webhooks")) == ["a1", "a2", "d1"]


async def test_rejections_and_refusals_are_recorded_not_retried(settings: Settings) -> None:
    """A 4xx: a dead letter on the webhooks topic at once (one request). Refused
    destinations: a ``refused`` record and not a single connection. The dlq gets nothing
    from the dispatcher, and its own dead letters are never delivered."""
    settings = with_webhooks(settings, allow="127.0.0.1")
    with (
        Receiver(lambda r: Answer(status=410, body=b"hook deleted")) as gone,
        Receiver(host="127.0.0.2") as other_loopback,
        Receiver(host="::1") as ipv6,
        Receiver() as named,
    ):
        own = dead_letter("w1", gone.url("/own"), stage="webhook-assets", offset=7)
        records = [
            ("assets", "r-gone", asset("r-gone", gone.url("/gone"))),
            ("assets", "r-127-2", asset("r-127-2", other_loopback.url())),
            ("assets", "r-v6", asset("r-v6", ipv6.url())),
            ("assets", "r-name", asset("r-name", named.url(host="localhost"))),
            ("dlq", "r-file", dead_letter("r-file", "file:///etc/passwd")),
            ("dlq", "w1", own),
        ]
        assets_rt, dlq_rt = runtimes(settings)
        async with TopicReader(settings, "webhooks", "dlq") as reader, assets_rt, dlq_rt:
            await publish(settings, records)
            await reader.until(lambda: len(reader.values("webhooks")) >= 5, timeout=60)
            await eventually(lambda: processed(dlq_rt) == 2 and processed(assets_rt) == 3)
    by_id = {r["id"]: r for r in reader.values("webhooks")}
    assert set(by_id) == {"r-gone", "r-127-2", "r-v6", "r-name", "r-file"}
    rejected = by_id["r-gone"]
    assert rejected["schema"] == "genseg.dead_letter/v1"
    assert rejected["stage"] == "webhook-assets" and rejected["attempts"] == 1
    assert rejected["error"]["type"] == "webhook_rejected"
    assert "answered 410: hook deleted" in rejected["error"]["message"]
    assert rejected["value"].encode() == records[0][2]
    assert len(gone.received()) == 1  # not retried; and the own dead letter not delivered
    reasons = {i: by_id[i].get("reason", "") for i in ("r-127-2", "r-v6", "r-name", "r-file")}
    assert all(by_id[i]["status"] == "refused" for i in reasons)
    assert "127.0.0.2 is a loopback address" in reasons["r-127-2"]
    assert "::1 is a loopback address" in reasons["r-v6"]
    assert "localhost is an internal name" in reasons["r-name"]
    assert "not an http or https URL" in reasons["r-file"]
    for receiver in (other_loopback, ipv6, named):
        assert receiver.connections == 0
    assert {d["id"] for d in reader.values("dlq")} == {"r-file", "w1"}  # only what we sent


async def test_timeouts_are_retried_then_given_up_visibly(settings: Settings) -> None:
    release = threading.Event()
    settings = with_webhooks(settings)
    try:
        with Receiver(lambda r: Answer(hold=release)) as receiver:
            assets_only = StageRuntime(
                WebhookStage(settings, "asset", limits=FAST_LIMITS),
                settings,
                RuntimeConfig(**{**FAST, "max_attempts": 2}),
            )
            async with assets_only, TopicReader(settings, "webhooks") as reader:
                await publish(settings, [("assets", "slow", asset("slow", receiver.url()))])
                await reader.until(lambda: len(reader.values("webhooks")) >= 1, timeout=60)
    finally:
        release.set()
    [dead] = reader.values("webhooks")
    assert dead["schema"] == "genseg.dead_letter/v1"
    assert dead["error"]["type"] == "webhook_timeout" and dead["attempts"] == 2
    requests = receiver.received()
    assert len(requests) == 2
    assert len({r.headers["x-genseg-delivery"] for r in requests}) == 1


# --- acceptance: a real dispatcher process, killed mid-run ----------------------------------

DISPATCHER = """
import asyncio, logging
from consumers.runtime import RuntimeConfig, StageRuntime
from genseg.workers import serve
from plumbing.settings import Settings
from webhook_worker import WEBHOOK_RUNTIME_DEFAULTS, dispatcher_stages

logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(message)s")
settings = Settings()
config = {**WEBHOOK_RUNTIME_DEFAULTS, "backoff_initial_ms": 100, "backoff_max_ms": 1000,
          "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 100}
asyncio.run(serve([StageRuntime(s, settings, RuntimeConfig(**config))
                   for s in dispatcher_stages(settings)]))
"""


class Dispatcher(WorkerProcess):
    """The dispatcher's two runtimes in one process (what ``genseg worker webhook`` runs)."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", DISPATCHER]

    async def wait_assigned(self, timeout: float = 120.0) -> None:
        await self.wait_logged("stage webhook-assets assigned [", timeout)
        await self.wait_logged("stage webhook-dlq assigned [", timeout)


class KillableReceiverScript:
    """The receiver's behaviour in the acceptance test: every fourth outcome's first
    attempt gets a 500; once ``hold_after`` outcomes are delivered, new requests are held
    (in flight when the dispatcher dies) and answered 503 on release, so only a
    redelivery by the next incarnation can deliver them."""

    def __init__(self, hold_after: int) -> None:
        self.hold_after = hold_after
        self.holding = True
        self.gate = threading.Event()
        self.delivered: set[str] = set()
        self.seen: set[str] = set()
        self.held: set[str] = set()  # delivery ids of the requests held
        self.lock = threading.Lock()

    def __call__(self, request: Received) -> Answer:
        delivery = request.headers["x-genseg-delivery"]
        flaky = int(hashlib.sha256(delivery.encode()).hexdigest(), 16) % 4 == 0
        with self.lock:
            first = delivery not in self.seen
            self.seen.add(delivery)
            if flaky and first:
                return Answer(status=500)
            if self.holding and len(self.delivered) >= self.hold_after:
                self.held.add(delivery)
                return Answer(status=503, hold=self.gate, hold_s=60)
            self.delivered.add(delivery)
        return Answer(status=200)

    def release(self) -> None:
        with self.lock:
            self.holding = False
        self.gate.set()


async def test_a_killed_dispatcher_leaves_no_outcome_undelivered(
    settings: Settings, tmp_path: Path
) -> None:
    """40 outcomes (30 asset-ready, some with two images, and 10 dead letters) with
    callback URLs; the dispatcher process is SIGKILLed while deliveries are in flight and
    restarted. Every outcome is delivered at least once, every signature checks, and
    deduped by X-Genseg-Delivery the deliveries are exactly the 40 outcomes."""
    await ensure_topics(settings, partitions=4)
    script = KillableReceiverScript(hold_after=12)
    env = worker_env(settings, GENSEG_WEBHOOK_SECRET=SECRET, GENSEG_WEBHOOK_ALLOW="127.0.0.1")
    dispatcher = Dispatcher("webhook", env, tmp_path, name="dispatcher")
    with Receiver(script) as receiver:
        outcomes: list[tuple[str, str, bytes]] = []
        for n in range(20):
            url = receiver.url(f"/assets?n={n}")
            outcomes.append(("assets", f"req-{n}", asset(f"req-{n}", url)))
            if n % 2 == 0:
                outcomes.append(("assets", f"req-{n}", asset(f"req-{n}", url, image_index=1)))
        for n in range(10):
            url = receiver.url(f"/failed?n={n}")
            outcomes.append(("dlq", f"dead-{n}", dead_letter(f"dead-{n}", url, offset=n)))
        assert len(outcomes) == 40
        try:
            dispatcher.start()
            await dispatcher.wait_assigned()
            await publish(settings, outcomes)

            def holding_some() -> bool:
                dispatcher.check_alive()
                return len(script.delivered) >= script.hold_after and len(script.held) >= 3

            await wait_until(holding_some, 120, "deliveries held in flight")
            dispatcher.kill()
            delivered_at_kill = set(script.delivered)
            in_flight_at_kill = set(script.held) - delivered_at_kill
            script.release()
            dispatcher.start()

            def all_delivered() -> bool:
                dispatcher.check_alive()
                return len(script.delivered) == 40

            await wait_until(all_delivered, 180, "every outcome delivered")
            async with TopicReader(settings, "webhooks") as reader:
                await reader.until(
                    lambda: len({r["delivery"] for r in reader.values("webhooks")}) == 40,
                    timeout=120,
                )
        finally:
            exit_code = dispatcher.stop(30)
    assert exit_code == 0, dispatcher.log()[-3000:]
    assert dispatcher.kills == 1 and len(delivered_at_kill) < 40
    assert in_flight_at_kill, "the kill came while deliveries were in flight"
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for request in receiver.received():
        assert verify(SECRET, request.body, request.headers["x-genseg-signature"])
        bodies[request.headers["x-genseg-delivery"]].add(request.body)
    assert all(len(b) == 1 for b in bodies.values()), "one delivery id, one outcome"
    delivered = {r.headers["x-genseg-delivery"] for r in receiver.answered()}
    assert len(delivered) == 40
    assert in_flight_at_kill <= delivered  # delivered by the next incarnation
    assert {next(iter(bodies[d])) for d in delivered} == {value for _, _, value in outcomes}
    assert len(receiver.received()) > 40  # retries and redeliveries happened
    records = reader.values("webhooks")
    assert {r["delivery"] for r in records} == delivered
    assert all(r["schema"] == "genseg.webhook/v1" and r["status"] == "delivered" for r in records)


async def test_genseg_worker_webhook_delivers_signed_outcomes(
    settings: Settings, tmp_path: Path
) -> None:
    """The command line's dispatcher: `genseg worker webhook` (both stages, one process)
    delivers an asset-ready and a dead-letter outcome, signed, and stops on SIGTERM."""
    await ensure_topics(settings, partitions=2)
    env = worker_env(settings, GENSEG_WEBHOOK_SECRET=SECRET, GENSEG_WEBHOOK_ALLOW="127.0.0.1")
    dispatcher = WorkerProcess("webhook", env, tmp_path, name="cli-dispatcher")
    with Receiver(lambda request: Answer(status=204)) as receiver:
        try:
            dispatcher.start()
            await dispatcher.wait_logged("stage webhook-assets assigned [")
            await dispatcher.wait_logged("stage webhook-dlq assigned [")
            await publish(
                settings,
                [
                    ("assets", "cli-a", asset("cli-a", receiver.url("/a"))),
                    ("dlq", "cli-d", dead_letter("cli-d", receiver.url("/d"))),
                ],
            )

            def both() -> bool:
                dispatcher.check_alive()
                return len(receiver.answered()) == 2

            await wait_until(both, 60, "both outcomes delivered")
        finally:
            exit_code = dispatcher.stop(30)
    assert exit_code == 0, dispatcher.log()[-3000:]
    requests = receiver.answered()
    assert {r.path for r in requests} == {"/a", "/d"}
    for request in requests:
        assert verify(SECRET, request.body, request.headers["x-genseg-signature"])
