"""The stage runtime against a real broker: nothing lost, poison isolated, commits honest."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import INVALID_SPAN, NoOpTracerProvider

from consumers.batching import Job, ReadyQueue
from consumers.fetcher import InFlight
from consumers.handoff import CHAIN_BUDGET_S
from consumers.metrics import StageMetrics, observe_many
from consumers.offsets import PartitionState
from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.stage import ItemResult, Output, StageContext
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from plumbing.telemetry import GensegTracerProvider, spans_recorded
from producers.publisher import Publisher
from schemas import PromptEvent, parse_prompts_record
from tests import forkserver
from tests.kafka_utils import TopicReader, committed_offsets, eventually
from tests.rel_utils import logged
from tests.toy_stage import Ping, Pong, ToyStage, fails

FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 50}


async def publish_all(settings: Settings, events: list[Ping], key: str | None = None) -> dict:
    """Publish ``events``; return id -> (partition, offset)."""
    async with Publisher(settings) as pub:
        futures = [
            await pub.send(settings.topics.prompts, e.to_json_bytes(), key=key or e.id, headers=[])
            for e in events
        ]
        metadata = await asyncio.gather(*futures)
    return {e.id: (m.partition, m.offset) for e, m in zip(events, metadata, strict=True)}


async def test_thousand_records_with_transient_failures_lose_nothing(settings: Settings) -> None:
    ids = [f"r{i:04d}" for i in range(1000)]
    fail_p = 0.3
    max_attempts = 3
    doomed = {i for i in ids if all(fails(i, a, fail_p) for a in range(1, max_attempts + 1))}
    assert 5 < len(doomed) < 80  # the seeded coin gives a meaningful dead-letter set
    stage = ToyStage()
    config = RuntimeConfig(
        max_batch=8,
        max_wait_ms=10,
        max_attempts=max_attempts,
        backoff_initial_ms=5,
        backoff_max_ms=40,
        **FAST,
    )
    async with StageRuntime(stage, settings, config) as rt:
        await publish_all(settings, [Ping(id=i, fail_p=fail_p, group="g") for i in ids])
        async with TopicReader(settings, "images", "dlq", unchecked=["images"]) as reader:
            await reader.until(
                lambda: len(set(reader.keys("images")) | set(reader.keys("dlq"))) == 1000,
                timeout=120,
            )
        assert rt.metrics.batch_size._sum.get() == sum(len(c) for c in stage.calls)
    outputs, dead = reader.keys("images"), reader.values("dlq")
    assert sorted(set(outputs) | {d["id"] for d in dead}) == ids
    assert {d["id"] for d in dead} == doomed
    assert set(outputs).isdisjoint(doomed)
    assert len(outputs) == len(set(outputs)), "no rebalance happened, so no duplicates"
    for d in dead:
        assert d["error"]["type"] == "Flaky"
        assert d["attempts"] == max_attempts
        assert "failed" in d["error"]["message"]
        assert d["stage"] == "toy"
        assert d["source"]["topic"] == settings.topics.prompts
    assert any(len(call) > 1 for call in stage.calls), "batches formed"


class PromptToyStage(ToyStage):
    """Parses the real prompts topic contract; answers with a Pong."""

    def parse(self, raw: bytes) -> PromptEvent:  # type: ignore[override]
        return parse_prompts_record(raw)

    def batch_key(self, event: object) -> None:
        return None

    def handle(self, events: list, ctx: StageContext) -> list[ItemResult]:  # type: ignore[override]
        return [[Output(ctx.topics.images, Pong(id=e.id, worker="p", attempt=1))] for e in events]


async def test_poison_records_are_dead_lettered_and_the_partition_flows(
    settings: Settings,
) -> None:
    good = [PromptEvent(id=f"good{i}", prompt="a cup").to_json_bytes() for i in range(4)]
    poison = [
        b"\xff\xfe this is not JSON",
        b'{"id": "bad-schema", "prompt": "x", "width": 65, "steps": 0}',
        PromptEvent.model_construct(id="huge", prompt="x" * 100_000).to_json_bytes(),
    ]
    sequence = [good[0], poison[0], good[1], poison[1], good[2], poison[2], good[3]]
    async with StageRuntime(PromptToyStage(), settings, RuntimeConfig(**FAST)) as rt:
        async with Publisher(settings) as pub:  # one key: all on one partition, in order
            futures = [
                await pub.send(settings.topics.prompts, v, key="same", headers=[]) for v in sequence
            ]
            metadata = await asyncio.gather(*futures)
        assert len({m.partition for m in metadata}) == 1
        async with TopicReader(settings, "images", "dlq", unchecked=["images"]) as reader:
            await reader.until(lambda: len(reader.keys("images")) + len(reader.keys("dlq")) == 7)
        tp = TopicPartition(settings.topics.prompts, metadata[0].partition)
        group = rt.group_id
        await eventually(lambda: rt.committed_offsets().get(tp) == metadata[-1].offset + 1)
    assert sorted(reader.keys("images")) == ["good0", "good1", "good2", "good3"]
    dead = {d["id"]: d for d in reader.values("dlq")}
    assert set(dead) == {"same", "bad-schema", "huge"}
    assert "not UTF-8" in dead["same"]["error"]["message"]
    assert "width" in dead["bad-schema"]["error"]["message"]
    assert "steps" in dead["bad-schema"]["error"]["message"]
    assert "prompt" in dead["huge"]["error"]["message"]
    assert dead["huge"]["value_truncated"] is True
    assert len(dead["huge"]["value"]) == 64 * 1024
    assert all(d["error"]["type"] == "validation" for d in dead.values())
    committed = await committed_offsets(settings, group, tp.topic, 4)
    assert committed[tp.partition] == metadata[-1].offset + 1


async def test_slow_record_holds_the_commit(settings: Settings) -> None:
    gate = threading.Event()
    stage = ToyStage(gates={"slow": gate})
    before = [Ping(id=f"a{i}") for i in range(2)]
    slow = Ping(id="slow", block="slow")
    after = [Ping(id=f"b{i}") for i in range(20)]
    config = RuntimeConfig(concurrency=2, **FAST)
    try:
        async with StageRuntime(stage, settings, config) as rt:
            offsets = await publish_all(settings, [*before, slow, *after], key="one")
            partition, k = offsets["slow"]
            tp = TopicPartition(settings.topics.prompts, partition)
            async with TopicReader(settings, "images", unchecked=["images"]) as reader:
                await reader.until(
                    lambda: {f"b{i}" for i in range(20)} <= set(reader.keys("images"))
                )
            # Everything after k is done; let the commit loop run a few more rounds.
            await eventually(lambda: rt.in_flight == 1, what="only the slow record in flight")
            rounds = rt.commit_rounds
            await eventually(lambda: rt.commit_rounds >= rounds + 3)
            assert rt.in_flight == 1
            assert rt.committed_offsets()[tp] == k
            broker_view = await committed_offsets(settings, rt.group_id, tp.topic, 4)
            assert broker_view[partition] == k
            gate.set()
            await eventually(lambda: rt.committed_offsets()[tp] == offsets["b19"][1] + 1)
    finally:
        gate.set()


async def test_a_record_fetched_while_stopping_is_left_to_the_next_owner(
    settings: Settings,
) -> None:
    """Stop drains what the handler holds and starts nothing new: a record fetched
    meanwhile is neither handled nor committed; the partition's next owner handles it."""
    gate = threading.Event()
    stage = ToyStage(gates={"hold": gate})
    rt = StageRuntime(stage, settings, RuntimeConfig(**FAST))
    await rt.start()
    try:
        await publish_all(settings, [Ping(id="held", block="hold")], key="one")
        await eventually(lambda: stage.calls == [["held"]], what="the held record in its handler")
        stopping = asyncio.create_task(rt.stop())
        assert rt._fetcher is not None
        await eventually(lambda: rt._fetcher.stopping, what="stop began")
        late = await publish_all(settings, [Ping(id="late")], key="one")
        await eventually(lambda: rt._fetcher.left_unaccepted == 1, what="the late record fetched")
        gate.set()
        await asyncio.wait_for(stopping, 30)
    finally:
        gate.set()
        await rt.stop()
    assert stage.calls == [["held"]]
    partition, offset = late["late"]
    committed = await committed_offsets(settings, rt.group_id, settings.topics.prompts, 4)
    assert committed[partition] == offset, "committed up to the late record, not past it"


async def test_handler_spans_join_the_publishers_trace(settings: Settings) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    async with StageRuntime(ToyStage(), settings, RuntimeConfig(**FAST), tracer_provider=provider):
        async with Publisher(settings, tracer_provider=provider) as pub:
            with tracer.start_as_current_span("upstream") as upstream:
                await pub.publish(settings.topics.prompts, Ping(id="traced"))
        async with TopicReader(settings, "images", unchecked=["images"]) as reader:
            await reader.until(lambda: "traced" in reader.keys("images"))
    trace_id = upstream.get_span_context().trace_id
    record = reader.records[settings.topics.images][0]
    traceparent = dict(record.headers)["traceparent"].decode()
    assert traceparent.split("-")[1] == f"{trace_id:032x}"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    process = spans[f"process {settings.topics.prompts}"]
    send = spans[f"send {settings.topics.prompts}"]
    assert process.context.trace_id == trace_id
    assert process.parent.span_id == send.context.span_id
    assert send.parent.span_id == upstream.get_span_context().span_id
    assert spans["toy.work"].parent.span_id == process.context.span_id
    assert spans["toy.item"].parent.span_id == spans["toy.work"].context.span_id
    assert traceparent.split("-")[2] == f"{process.context.span_id:016x}"


async def test_batches_form_and_their_span_links_every_record(settings: Settings) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await ensure_topics(settings, partitions=1)
    await publish_all(settings, [Ping(id=f"b{i}", group="same") for i in range(8)])
    stage = ToyStage()
    config = RuntimeConfig(max_batch=4, max_wait_ms=500, **FAST)
    async with StageRuntime(stage, settings, config, tracer_provider=provider) as rt:
        async with TopicReader(settings, "images", unchecked=["images"]) as reader:
            await reader.until(lambda: len(reader.keys("images")) == 8)
        assert rt.metrics.batch_size._sum.get() == 8
    assert max(len(call) for call in stage.calls) == 4
    batch_spans = [s for s in exporter.get_finished_spans() if s.name == "batch toy"]
    assert batch_spans and all(
        len(s.links) == s.attributes["genseg.batch.size"] for s in batch_spans
    )
    process_ids = {
        s.context.span_id for s in exporter.get_finished_spans() if s.name.startswith("process")
    }
    assert {link.context.span_id for s in batch_spans for link in s.links} <= process_ids


async def test_records_without_a_span_processor_keep_the_upstream_trace(
    settings: Settings,
) -> None:
    """No exporter (or no SDK): the process span is only ids, and they still propagate."""
    upstream_trace, upstream_span = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    header = f"00-{upstream_trace:032x}-{upstream_span:016x}-01".encode()
    for provider in (GensegTracerProvider(), NoOpTracerProvider()):
        assert not spans_recorded(provider)
        async with StageRuntime(
            ToyStage(), settings, RuntimeConfig(**FAST), tracer_provider=provider
        ):
            async with Publisher(settings) as pub:
                for i, headers in enumerate([[("traceparent", header)], []]):
                    key = f"{type(provider).__name__}-{i}"
                    await (
                        await pub.send(
                            settings.topics.prompts,
                            Ping(id=key).to_json_bytes(),
                            key=key,
                            headers=headers,
                        )
                    )
            async with TopicReader(settings, "images", unchecked=["images"]) as reader:
                names = {f"{type(provider).__name__}-{i}" for i in range(2)}
                await reader.until(lambda names=names: names <= set(reader.keys("images")))
        by_key = {r.key.decode(): dict(r.headers) for r in reader.records[settings.topics.images]}
        traced = by_key[f"{type(provider).__name__}-0"]["traceparent"].decode().split("-")
        assert traced[1] == f"{upstream_trace:032x}" and traced[3] == "01"
        assert traced[2] != f"{upstream_span:016x}", "the process span has an id of its own"
        # A record without a traceparent starts a trace: every output carries one.
        fresh = by_key[f"{type(provider).__name__}-1"]["traceparent"].decode().split("-")
        assert fresh[1] != "0" * 32 and fresh[1] != traced[1]


def test_in_flight_defaults_to_two_batches_a_slot() -> None:
    assert RuntimeConfig().max_in_flight == 8, "at least 8"
    assert RuntimeConfig(max_batch=4).max_in_flight == 8
    assert RuntimeConfig(max_batch=4, concurrency=3).max_in_flight == 24
    assert RuntimeConfig(max_batch=4, max_in_flight=64).max_in_flight == 64
    with pytest.raises(ValueError, match="max_in_flight"):
        RuntimeConfig(max_batch=4, max_in_flight=3)


@pytest.mark.parametrize(
    ("options", "bound"),
    [({"max_in_flight": 5}, 5), ({"max_batch": 6, "max_wait_ms": 1}, 12)],
    ids=["explicit", "default"],
)
async def test_in_flight_is_bounded_and_fetching_resumes(
    settings: Settings, options: dict[str, int], bound: int
) -> None:
    """At ``max_in_flight`` the partitions pause; as records finish, fetching resumes."""
    gate = threading.Event()
    stage = ToyStage(gates={"hold": gate})
    config = RuntimeConfig(**options, **FAST)
    events = [Ping(id="held", block="hold"), *(Ping(id=f"q{i:02d}") for i in range(40))]
    try:
        async with StageRuntime(stage, settings, config) as rt:
            await publish_all(settings, events, key="one")
            await eventually(lambda: rt.in_flight == bound, what="max_in_flight records accepted")
            rounds = rt.commit_rounds
            await eventually(lambda: rt.commit_rounds >= rounds + 5)
            assert rt.in_flight == bound, "paused at max_in_flight"
            in_flight = rt.metrics.registry.get_sample_value("genseg_in_flight", {"stage": "toy"})
            assert in_flight == bound
            gate.set()
            async with TopicReader(settings, "images", unchecked=["images"]) as reader:
                await reader.until(lambda: len(set(reader.keys("images"))) == len(events))
            await eventually(lambda: rt.in_flight == 0)
            assert rt.metrics.registry.get_sample_value("genseg_in_flight", {"stage": "toy"}) == 0
            received = rt.metrics.registry.get_sample_value(
                "genseg_records_received_total", {"stage": "toy"}
            )
            assert received == len(events)
    finally:
        gate.set()


async def test_a_short_wait_for_room_keeps_the_partitions_fetching(settings: Settings) -> None:
    """Full, the fetch loop waits ``pause_after_ms`` with its partitions fetching (a
    pause drops what the consumer prefetched), and pauses them only after that."""
    gate = threading.Event()
    stage = ToyStage(gates={"hold": gate})
    config = RuntimeConfig(max_in_flight=5, pause_after_ms=600, **FAST)
    events = [Ping(id="held", block="hold"), *(Ping(id=f"q{i:02d}") for i in range(20))]
    try:
        async with StageRuntime(stage, settings, config) as rt:
            consumer = rt._consumer
            assert consumer is not None
            await publish_all(settings, events, key="one")
            await eventually(lambda: rt.in_flight == 5, what="max_in_flight records accepted")
            full_at = time.monotonic()
            await eventually(lambda: bool(consumer.paused()), what="partitions paused")
            assert time.monotonic() - full_at >= 0.5, "paused before pause_after_ms"
            gate.set()
            await eventually(lambda: not consumer.paused(), what="fetching resumed")
            async with TopicReader(settings, "images", unchecked=["images"]) as reader:
                await reader.until(lambda: len(set(reader.keys("images"))) == len(events))
    finally:
        gate.set()


async def test_the_group_session_is_the_settings_unless_the_config_names_one(
    settings: Settings,
) -> None:
    """``KAFKA_SESSION_TIMEOUT_MS`` is the session of every runtime whose config names none
    (a crashed worker's partitions move after it); 3 s is the least it takes."""
    short = settings.model_copy(update={"kafka_session_timeout_ms": 3000})
    for config, expected in (
        (RuntimeConfig(heartbeat_interval_ms=500), 3000),
        (RuntimeConfig(**FAST), 6000),
    ):
        async with StageRuntime(ToyStage(), short, config) as rt:
            assert rt._consumer is not None
            assert rt._consumer._session_timeout_ms == expected  # what aiokafka joins with
    with pytest.raises(ValueError, match="greater than or equal to 3000"):
        Settings(kafka_session_timeout_ms=2000)


def test_pause_after_must_be_below_the_poll_interval() -> None:
    with pytest.raises(ValueError, match="pause_after_ms"):
        RuntimeConfig(pause_after_ms=300_000)
    with pytest.raises(ValueError, match="pause_after_ms"):
        RuntimeConfig(pause_after_ms=-1)


def _job(offset: int, key: str | None = "k", alone: bool = False) -> Job:
    record = ConsumerRecord(
        topic="t", partition=0, offset=offset, timestamp=0, timestamp_type=0, key=None,
        value=b"", checksum=None, serialized_key_size=0, serialized_value_size=0, headers=(),
    )  # fmt: skip
    part = PartitionState(TopicPartition("t", 0))
    part.accept(offset)
    return Job(record, part, INVALID_SPAN, time.monotonic(), batch_key=key, alone=alone)


async def test_records_waiting_for_acks_count_against_max_unacked_not_max_in_flight() -> None:
    in_flight = InFlight(limit=4, max_batch=1, ack_limit=6)
    first = [_job(i) for i in range(4)]
    in_flight.add(len(first))
    assert in_flight.full(), "four records waiting for the handler: max_in_flight"
    in_flight.done_handling(first)
    assert (in_flight.count, in_flight.waiting, in_flight.handled) == (4, 0, 4)
    assert not in_flight.full() and in_flight.room.is_set(), "fetching may go on"
    second = [_job(i) for i in range(4, 6)]
    in_flight.add(len(second))
    in_flight.done_handling(second)
    assert in_flight.full(), "six records waiting for acks: max_unacked"
    in_flight.settle(first[0], completed=True)
    assert in_flight.resumable() and not in_flight.full()
    in_flight.requeue(first[1])  # a retry goes back to the handler
    assert (in_flight.waiting, in_flight.handled) == (1, 4)
    for job in [*first[1:], *second]:
        in_flight.settle(job, completed=True)
    assert in_flight.count == in_flight.handled == 0 and in_flight.idle.is_set()


async def test_settling_done_records_together_counts_as_one_by_one() -> None:
    together, alone = InFlight(limit=8, max_batch=1), InFlight(limit=8, max_batch=1)
    jobs = [[_job(i) for i in range(5)] for _ in range(2)]
    for in_flight, batch in zip((together, alone), jobs, strict=True):
        in_flight.add(len(batch))
        in_flight.done_handling(batch[:3])
    together.settle_done(jobs[0])
    for job in jobs[1]:
        alone.settle(job, completed=True)
    for in_flight, batch in zip((together, alone), jobs, strict=True):
        assert (in_flight.count, in_flight.handled, in_flight.idle.is_set()) == (0, 0, True)
        assert batch[0].partition.committable() == batch[0].record.offset + 1


def test_observe_many_is_observe_of_each() -> None:
    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 7.0, 1e9, float("nan"), 1, 1]
    one, many = (StageMetrics("toy") for _ in range(2))
    for value in values:
        one.latency.observe(value)
    observe_many(many.latency, values)

    def samples(metrics: StageMetrics) -> list[tuple[str, dict[str, str], float]]:
        found = metrics.registry.get_sample_value
        assert found("genseg_stage_latency_seconds_count", {"stage": "toy"}) == len(values) - 1
        [metric] = [m for m in metrics.registry.collect() if m.name.endswith("latency_seconds")]
        return [(s.name, s.labels, s.value) for s in metric.samples if "created" not in s.name]

    left, right = samples(one), samples(many)
    assert [x[:2] for x in left] == [x[:2] for x in right]
    for (_, _, a), (_, _, b) in zip(left, right, strict=True):
        assert a == b or (a != a and b != b)  # the sum is NaN in both


async def test_take_ready_takes_only_batches_that_need_no_wait() -> None:
    queue = ReadyQueue(max_batch=2, max_wait_ms=60_000)
    full = [_job(0, "a"), _job(1, "a")]
    alone = _job(2, None)
    filling = _job(3, "b")
    for job in [*full, alone, filling, _job(4, "c")]:
        queue.append(job)
    assert queue.take_ready(10) == [full, [alone]], "b may still fill: it stays"
    assert len(queue) == 2
    assert queue.take_ready(10) == []


async def test_a_fast_handler_shares_trips_and_a_slow_call_stops_it(settings: Settings) -> None:
    """Batches of a handler whose calls take microseconds go to the worker thread
    together, and fetching may run that far ahead; one slow trip restores one batch a
    trip and ``max_in_flight``. Several workers never share trips."""
    rt = StageRuntime(ToyStage(), settings, RuntimeConfig())
    assert rt.handoff.room() == 0, "unknown pace: one batch a trip"
    assert rt.in_flight_records.limit == 8
    rt.handoff.follow_pace([20e-6] * 8)
    assert rt.handoff.room() == round(CHAIN_BUDGET_S / 20e-6) - 1
    assert rt.in_flight_records.limit == 2 * round(CHAIN_BUDGET_S / 20e-6)
    rt.handoff.follow_pace([0.5])
    assert rt.handoff.room() == 0 and rt.in_flight_records.limit == 8
    rt.handoff.follow_pace([20e-6] * 8)
    assert rt.handoff.room() == 0, "it comes back only slowly"

    several = StageRuntime(ToyStage(), settings, RuntimeConfig(concurrency=2))
    several.handoff.follow_pace([20e-6] * 8)
    assert several.handoff.room() == 0 and several.in_flight_records.limit == 8


# --- worker processes -------------------------------------------------------------------


def start_worker(settings: Settings, name: str, log_dir: Path) -> tuple[forkserver.Process, Path]:
    log_path = log_dir / f"{name}.log"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "GENSEG_TOPIC_PREFIX": settings.topic_prefix,
        "GENSEG_BLOB_URL": settings.blob_url,
        "TOY_WORKER": name,
        "TOY_LOG": "INFO",
    }
    with log_path.open("wb") as log:
        proc = forkserver.popen(
            [sys.executable, "-m", "tests.toy_stage"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
        )
    return proc, log_path


@pytest.mark.slow
async def test_sigkilled_worker_restarts_without_loss(settings: Settings, tmp_path: Path) -> None:
    await ensure_topics(settings, partitions=4)
    ids = [f"k{i:03d}" for i in range(300)]
    offsets = await publish_all(settings, [Ping(id=i, work_ms=10) for i in ids])
    first, _ = start_worker(settings, "first", tmp_path)
    try:
        async with TopicReader(settings, "images", unchecked=["images"]) as reader:
            await reader.until(lambda: len(reader.keys("images")) >= 60, timeout=90)
            first.send_signal(signal.SIGKILL)
            first.wait()
            at_kill = await committed_offsets(
                settings, f"{settings.topic_prefix}.toy", settings.topics.prompts, 4
            )
            assert sum(v or 0 for v in at_kill.values()) > 0, "some progress was committed"
            second, _ = start_worker(settings, "second", tmp_path)
            try:
                await reader.until(lambda: set(reader.keys("images")) >= set(ids), timeout=120)
            finally:
                second.terminate()
                second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    pongs = reader.values("images")
    assert {p["id"] for p in pongs} == set(ids)
    by_worker = Counter(p["worker"] for p in pongs)
    assert by_worker["first"] >= 60 and by_worker["second"] > 0
    for pong in pongs:
        if pong["worker"] == "second":
            partition, offset = offsets[pong["id"]]
            assert offset >= (at_kill[partition] or 0), f"{pong['id']} was committed, redone"


@pytest.mark.slow
async def test_two_workers_share_and_one_takes_over_after_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    await ensure_topics(settings, partitions=4)
    a, a_log = start_worker(settings, "a", tmp_path)
    b, b_log = start_worker(settings, "b", tmp_path)
    try:
        # Both members hold partitions once the second join's rebalance completed.
        await eventually(lambda: logged(a, a_log, "stage toy assigned ["), 60)
        await eventually(lambda: logged(b, b_log, "stage toy assigned ["), 60)
        ids = [f"s{i:03d}" for i in range(400)]
        await publish_all(settings, [Ping(id=i, work_ms=15) for i in ids])
        async with TopicReader(settings, "images", unchecked=["images"]) as reader:
            await reader.until(
                lambda: {"a", "b"} <= {p["worker"] for p in reader.values("images")}, timeout=60
            )
            a.send_signal(signal.SIGTERM)
            assert a.wait(30) == 0, a_log.read_text()[-3000:]
            await reader.until(lambda: set(reader.keys("images")) >= set(ids), timeout=120)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    pongs = reader.values("images")
    assert {p["id"] for p in pongs} == set(ids)
    workers = Counter(p["worker"] for p in pongs)
    assert workers["a"] > 0 and workers["b"] > 0
    assert "stage toy stopped" in a_log.read_text()


async def test_lag_after_a_restart_counts_from_the_groups_committed_offset(
    settings: Settings,
) -> None:
    await ensure_topics(settings, partitions=1)
    await publish_all(settings, [Ping(id=f"l{i}") for i in range(10)])
    config = RuntimeConfig(lag_interval_s=0.05, **FAST)
    async with StageRuntime(ToyStage(), settings, config):
        async with TopicReader(settings, "images", unchecked=["images"]) as reader:
            await reader.until(lambda: len(reader.keys("images")) == 10)
    tp = TopicPartition(settings.topics.prompts, 0)
    async with StageRuntime(ToyStage(), settings, config) as second:
        sample = second.metrics.registry.get_sample_value
        labels = {"stage": "toy", "topic": tp.topic, "partition": "0"}
        await eventually(lambda: sample("genseg_consumer_lag", labels) is not None, 30)
        assert sample("genseg_consumer_lag", labels) == 0  # not the whole partition (10)


def test_a_serving_process_sets_its_garbage_collector_up() -> None:
    """``settle_gc_for_serving`` (``genseg worker`` calls it once its models are loaded):
    what is alive is frozen, and young collections wait for 20,000 allocations. In a
    process of its own: the setting is process-wide."""
    code = (
        "import gc, weakref\n"
        "from genseg.workers import SERVING_GC_THRESHOLD, settle_gc_for_serving\n"
        "class Node: pass\n"
        "gc.disable()  # a cycle left by loading, not yet collected\n"
        "node = Node(); node.me = node; left = weakref.ref(node); del node\n"
        "before = gc.get_threshold()\n"
        "settle_gc_for_serving()\n"
        "after = gc.get_threshold()\n"
        "print(gc.get_freeze_count(), after[0] == SERVING_GC_THRESHOLD, "
        "after[1:] == before[1:], left() is None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    frozen, threshold_set, older_kept, garbage_gone = done.stdout.split()
    assert int(frozen) > 1000  # the modules' objects, at least
    assert (threshold_set, older_kept) == ("True", "True")
    assert garbage_gone == "True", "cyclic garbage was frozen instead of collected"
