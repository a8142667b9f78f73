"""Benchmark: the generator worker's overhead over calling the generation directly.

Side by side in one run, on one machine, with the same loaded models:

- ``direct``: :meth:`gen_worker.generate.Generator.generate` on the requests in batches
  of the gen worker's default ``max_batch`` (4), in a thread of this process (the
  event loop stays free);
- ``worker``: the same requests published to Kafka (the embedded tansu broker unless
  ``KAFKA_BOOTSTRAP_SERVERS`` is set), consumed by a :class:`GenStage` inside a stage
  runtime in this process at ``genseg worker``'s default configuration
  (micro-batching, image and heat-map PNGs, blob writes, image-ready and progress
  events). A client in a process of its own (:mod:`bench.clients`; as clients are: a
  :class:`~producers.publisher.Publisher` and a :class:`~consumers.subscriber.Subscriber`
  with the default fetch wait, and no model code) times it from its first publish until
  it has read the last image-ready event.
- ``polled`` (only with ``--polled``; a diagnostic, no target): the direct run while a
  client process of the worker rounds' kind, without requests, polls the broker:
  what the client and the broker alone take from the generation on this machine.
- ``process`` (only with ``--model-process``; a diagnostic, no target): the worker
  with its generation in a process of its own (:mod:`bench.model_process`, forked
  before anything else starts), the runtime's event loop apart from the model's GIL;
  its CPU counts that process too.

The runtime and the client exist only during worker rounds: they start and join
their groups before the clock and stop after it, so a direct round runs beside
nothing but the idle broker, and a worker round beside an idle thread pool. Modes
alternate for ``--repeats`` rounds (the order flips each round; the same seeds in
both modes of a round). Per round: the worker's wall seconds over the direct run's,
and its CPU seconds (this process, which holds the worker, and the broker) over the
direct run's (this process); the client's own CPU is reported apart, and so is the
event loop's (``thread_cpu_s``: in a worker round the runtime's loop, whose Python work
the generating thread pays for again through the GIL, bench/gil_tax.py). The medians of
those ratios and their spread count; the target is <= 1.10 for both. Each round also
records the machine's other load. Prints the machine and, as the last line, one JSON
object ``{"bench": "gen", ...}``.

The process's garbage collector is set up as in a ``genseg worker`` process once the
models are loaded (:func:`genseg.workers.settle_gc_for_serving`), for both modes.

Threads: torch runs, at any time, on one thread of this process only, as in a
``genseg worker`` process (whose runtime loads the models and runs the handler on its
one executor thread). The models are built, and each direct round runs, on a thread
that exits afterwards, and a worker round starts only once the previous runtime's
thread is gone. Why it matters: libgomp (torch's OpenMP) stops spin-waiting at its
barriers when more of its threads exist than the machine has cores, so a second live
thread that once ran a parallel torch op (its idle OpenMP team stays) made every
parallel region on this 2-core machine sleep on a futex: the same generation 3.7x
slower in wall time and 1.7x in CPU, whichever side it hit.

    python bench/gen.py                 # 32 requests, tiny profile, 64x64, 20 steps, 5 rounds
    python bench/gen.py --profile-worker /tmp/gen.pstats  # cProfile of the worker rounds
    python bench/gen.py --polled  # and the direct run beside an idle polling client
    python bench/gen.py --model-process  # and the worker with its model in another process
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clients import client_process
from bench.harness import on_broker, quiet_logs
from bench.machine import LoadMeter, describe, load_average, spread
from bench.model_process import ModelProcess, ProcessGenerator
from consumers.runtime import StageRuntime
from gen_worker.generate import Generator, Sample
from gen_worker.handler import GenStage
from gen_worker.profiles import GenModels
from gen_worker.requests import batch_spec, image_seeds
from genseg.workers import runtime_config, settle_gc_for_serving
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from schemas import PromptEvent

log = logging.getLogger("bench.gen")
T = TypeVar("T")

TARGET = 1.10
#: The gen worker's default batch (the diagnostics that call ``run_direct`` use it too).
GEN_MAX_BATCH = int(GenStage.runtime_defaults["max_batch"])
#: A worker does the direct call's work and more: a ratio under this is a disturbed run.
PLAUSIBLE = 0.95


def requests(n: int, size: int, steps: int, run: str, seed0: int = 1000) -> list[PromptEvent]:
    return [
        PromptEvent(
            id=f"bench-{run}-{i:03d}",
            prompt=f"a coffee cup on a wooden table, photo {i}",
            targets=["coffee cup"],
            width=size,
            height=size,
            steps=steps,
            seed=seed0 + i,
        )
        for i in range(n)
    ]


async def in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread, joined before returning (see "Threads" above)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-torch") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def until_runtime_threads_gone(prefix: str, timeout_s: float = 30.0) -> None:
    """Wait until the stopped runtime's executor thread (``prefix``...) has exited."""
    deadline = time.perf_counter() + timeout_s
    while any(t.name.startswith(prefix) for t in threading.enumerate()):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"thread {prefix}* still alive after {timeout_s} s")
        await asyncio.sleep(0.01)


def run_direct(generator: Generator, events: list[PromptEvent], max_batch: int) -> float:
    """Seconds for generating every request with the generator alone."""
    started = time.perf_counter()
    for start in range(0, len(events), max_batch):
        chunk = events[start : start + max_batch]
        samples = [
            Sample(e.prompt, seed, e.negative_prompt, tuple(e.targets))
            for e in chunk
            for seed in image_seeds(e)
        ]
        generator.generate(batch_spec(chunk[0]), samples)
    return time.perf_counter() - started


def verdict(wall: float, cpu: float) -> bool | None:
    """Whether the target is met; None (no verdict) when the worker measured clearly
    faster than the call it wraps: the direct run was disturbed (on a loaded machine,
    torch's intra-op threads of a one-thread process can spin for minutes)."""
    if min(wall, cpu) < PLAUSIBLE:
        return None
    return wall <= TARGET and cpu <= TARGET


async def wait_assigned(rt: StageRuntime, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not rt.committed_offsets():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no partitions after {timeout} s")
        await asyncio.sleep(0.05)


async def beside_polling_client(
    settings: Settings, meter: LoadMeter, timeout_s: float, fn: Callable[..., T], *args: Any
) -> T:
    """``fn(*args)`` on a fresh thread while an idle client polls the broker from its own
    process (``meter`` covers the call and counts the client as ``client``): what a
    waiting client and the broker alone take from the work beside them (a diagnostic)."""
    async with client_process("poll", settings, [], timeout_s) as poller:
        meter.roles["client"] = [poller.pid]
        with meter:
            return await in_fresh_thread(fn, *args)


async def run_worker(
    stage: GenStage,
    settings: Settings,
    events: list[PromptEvent],
    meter: LoadMeter,
    timeout_s: float,
    profiler: cProfile.Profile | None = None,
    client_role: str = "batch",
) -> tuple[Any, StageRuntime]:
    """The reply of a ``client_role`` client (:mod:`bench.clients`; by default ``batch``:
    the seconds from its first publish until it read the last image-ready event) through
    a runtime started (and joined) for this round; ``meter`` covers that span (the
    client's pid is added to it as ``client``)."""
    rt = StageRuntime(stage, settings, runtime_config(stage, create_topics=False))
    async with rt:
        await wait_assigned(rt, timeout_s)
        async with client_process(client_role, settings, events, timeout_s) as client:
            meter.roles["client"] = [client.pid]
            if profiler is not None:
                profiler.enable()
            with meter:
                reply = await client.go(timeout_s)
            if profiler is not None:
                profiler.disable()
    await until_runtime_threads_gone(f"genseg-{stage.name}")
    return reply, rt


def histogram_totals(histogram: Any) -> tuple[float, float]:
    [metric] = histogram.collect()
    values = {s.name.removeprefix(metric.name): s.value for s in metric.samples}
    return values["_count"], values["_sum"]


async def load_generator(
    args: argparse.Namespace, bootstrap: str, blob_dir: str, prefix: str
) -> tuple[Settings, Generator]:
    """A run's settings (topics under ``prefix`` + this pid, created) and the generator of
    ``args.profile`` on ``args.device``, built on a thread that exits (see "Threads")."""
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=f"{prefix}{os.getpid()}",
        blob_url=blob_dir,
        models=args.profile,
        device=args.device,
    )
    await ensure_topics(settings)
    return settings, Generator(await in_fresh_thread(GenModels.from_settings, settings))


async def bench(
    args: argparse.Namespace,
    bootstrap: str,
    blob_dir: str,
    broker_pid: int | None,
    model_process: ModelProcess | None = None,
) -> dict[str, Any]:
    info = {**describe(), "cuda": torch.cuda.is_available()}  # the commit as the run starts
    settings, generator = await load_generator(args, bootstrap, blob_dir, "bench")
    models = generator.models
    # Built here, not by genseg.workers: the stage shares its models with the direct path.
    stage = GenStage(settings, generator=generator)
    remote = (
        None
        if model_process is None
        else GenStage(settings, generator=ProcessGenerator(generator, model_process))
    )
    config = runtime_config(stage)
    settle_gc_for_serving()  # as genseg worker does once its models are loaded; both modes
    roles = {"bench": [os.getpid()], "broker": [broker_pid] if broker_pid else []}
    # The warm-up and each round get a meter (and a client pid) of their own.
    profiler = cProfile.Profile() if args.profile_worker else None
    rounds: list[dict[str, Any]] = []
    batches = [0.0, 0.0]
    n = args.requests
    # Warm up both paths (topic metadata, first-call allocations).
    await run_worker(
        stage, settings, requests(2, args.size, 2, "warm"), LoadMeter({}), args.timeout
    )
    await in_fresh_thread(
        run_direct, generator, requests(2, args.size, 2, "warm"), config.max_batch
    )
    if remote is not None:
        await run_worker(
            remote, settings, requests(2, args.size, 2, "warmp"), LoadMeter({}), args.timeout
        )
    for r in range(args.repeats):
        seed0 = 1000 + 100 * r
        row: dict[str, Any] = {"round": r}
        modes = [
            "direct",
            "worker",
            *(["polled"] if args.polled else []),
            *(["process"] if remote is not None else []),
        ]
        for mode in modes if r % 2 == 0 else modes[::-1]:
            events = requests(n, args.size, args.steps, f"{mode[0]}{r}", seed0)
            meter = LoadMeter(dict(roles))
            if mode == "direct":
                with meter:
                    seconds = await in_fresh_thread(run_direct, generator, events, config.max_batch)
            elif mode == "polled":
                seconds = await beside_polling_client(
                    settings, meter, args.timeout, run_direct, generator, events, config.max_batch
                )
            elif mode == "process":
                assert remote is not None and model_process is not None
                meter.roles["bench"] = [os.getpid(), model_process.pid]
                reply, _ = await run_worker(remote, settings, events, meter, args.timeout)
                seconds = float(reply)
            else:
                reply, rt = await run_worker(stage, settings, events, meter, args.timeout, profiler)
                seconds = float(reply)
                count, total = histogram_totals(rt.metrics.batch_size)
                batches[0] += count
                batches[1] += total
            # What the mode costs: this process, and for the worker the broker too.
            cpu = meter.by_role["bench"] + meter.by_role.get("broker", 0.0)
            row[mode] = {"s": round(seconds, 3), "cpu_s": round(cpu, 3), **meter.report()}
        row["ratio"] = round(row["worker"]["s"] / row["direct"]["s"], 3)
        row["cpu_ratio"] = round(row["worker"]["cpu_s"] / max(row["direct"]["cpu_s"], 1e-9), 3)
        if args.polled:
            row["polled_ratio"] = round(row["polled"]["s"] / row["direct"]["s"], 3)
        if remote is not None:
            row["process_ratio"] = round(row["process"]["s"] / row["direct"]["s"], 3)
            row["process_cpu_ratio"] = round(row["process"]["cpu_s"] / row["direct"]["cpu_s"], 3)
        rounds.append(row)
        log.info("round %d: %s", r, json.dumps(row))
    if profiler is not None:
        profiler.dump_stats(args.profile_worker)
    wall = spread([r["ratio"] for r in rounds])
    cpu = spread([r["cpu_ratio"] for r in rounds])

    def per_image(mode: str, key: str) -> float:
        return round(statistics.median(r[mode][key] for r in rounds) / n, 4)

    return {
        "bench": "gen",
        "profile": args.profile,
        "device": str(models.device),
        "size": args.size,
        "steps": args.steps,
        "requests": n,
        "config": {
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "max_in_flight": config.max_in_flight,
            "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        },
        "repeats": args.repeats,
        "direct_s_per_image": per_image("direct", "s"),
        "worker_s_per_image": per_image("worker", "s"),
        "direct_cpu_s_per_image": per_image("direct", "cpu_s"),
        "worker_cpu_s_per_image": per_image("worker", "cpu_s"),
        "worker_event_loop_cpu_s_per_image": per_image("worker", "thread_cpu_s"),
        "ratio": wall["median"],
        "ratio_spread": wall,
        "cpu_ratio": cpu["median"],
        "cpu_ratio_spread": cpu,
        "target_ratio": TARGET,
        "ok": verdict(wall["median"], cpu["median"]),
        **({"polled_ratio": spread([r["polled_ratio"] for r in rounds])} if args.polled else {}),
        **(
            {
                "process_ratio": spread([r["process_ratio"] for r in rounds]),
                "process_cpu_ratio": spread([r["process_cpu_ratio"] for r in rounds]),
            }
            if remote is not None
            else {}
        ),
        "mean_batch": round(batches[1] / max(batches[0], 1), 2),
        "other_load_cores": spread(
            [r[m].get("other_load_cores") or 0.0 for r in rounds for m in ("direct", "worker")], 2
        ),
        "load_avg_after": load_average(),
        "rounds": rounds,
        "machine": info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="tiny", choices=["tiny", "random", "pretrained"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--profile-worker", help="write a cProfile of the worker rounds here")
    parser.add_argument(
        "--polled",
        action="store_true",
        help="a third mode per round: the direct run while an idle client polls the broker",
    )
    parser.add_argument(
        "--model-process",
        action="store_true",
        help="a mode per round: the worker with its generation in a process of its own",
    )
    args = parser.parse_args()
    quiet_logs(("aiokafka", "diffusers", "transformers", "consumers", "gen_worker"))
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print("machine:", json.dumps(describe()))
    # Forked first: before this process computes with torch or starts a thread.
    model_process = (
        ModelProcess(Settings(models=args.profile, device=args.device))
        if args.model_process
        else None
    )
    try:
        result = on_broker(
            lambda bootstrap, blobs, pid: bench(args, bootstrap, blobs, pid, model_process)
        )
    finally:
        if model_process is not None:
            model_process.close()
    print(
        f"worker / direct, median of {result['repeats']} rounds: wall {result['ratio']:.3f}, "
        f"CPU {result['cpu_ratio']:.3f} (target <= {TARGET}); mean batch {result['mean_batch']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
