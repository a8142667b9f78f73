"""Benchmark: the generator worker's overhead over calling the generation directly.

Side by side in one run, on one machine, with the same loaded models:

- ``direct``: :meth:`gen_worker.generate.Generator.generate` in one process, the
  requests in batches of ``--max-batch`` (the worker's best case);
- ``worker``: the same requests published to Kafka (the embedded tansu broker unless
  ``KAFKA_BOOTSTRAP_SERVERS`` is set), consumed by a :class:`GenStage` inside the stage
  runtime (micro-batching, blob store writes, image-ready and progress events), timed
  from the first publish to the last image-ready event received.

Modes alternate ``--repeats`` times; the best run of each counts. Wall-clock seconds
per image give the headline ratio; this process's CPU seconds per image are reported
too, being less sensitive to other load on a shared machine. Prints the machine
and, as the last line, one JSON object ``{"bench": "gen", ...}``.

    python bench/gen.py                 # 32 requests, tiny profile, 64x64, 20 steps
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.subscriber import Subscriber
from gen_worker.generate import Generator, Sample
from gen_worker.handler import GenStage, batch_spec, image_seeds
from gen_worker.profiles import GenModels
from plumbing.broker import EmbeddedBroker
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import ImageReadyEvent, PromptEvent

log = logging.getLogger("bench.gen")


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def requests(n: int, size: int, steps: int, run: str) -> list[PromptEvent]:
    return [
        PromptEvent(
            id=f"bench-{run}-{i:03d}",
            prompt=f"a coffee cup on a wooden table, photo {i}",
            targets=["coffee cup"],
            width=size,
            height=size,
            steps=steps,
            seed=1000 + i,
        )
        for i in range(n)
    ]


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


async def run_worker(
    rt: StageRuntime, settings: Settings, events: list[PromptEvent], timeout_s: float
) -> float:
    """Seconds from the first publish to the last image-ready event, through the worker."""
    wanted = {e.id for e in events}
    seen: set[str] = set()
    strays = 0
    async with Subscriber(settings, ["images", "dlq"]) as sub, Publisher(settings) as pub:
        started = time.perf_counter()
        await asyncio.gather(*(pub.publish(settings.topics.prompts, e) for e in events))
        deadline = started + timeout_s
        while not wanted <= seen:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(wanted - seen)} images missing after {timeout_s} s")
            for topic, event in await sub.next_events(0.2):
                if getattr(event, "id", None) not in wanted:
                    strays += 1
                    continue
                if topic != settings.topics.images:
                    raise RuntimeError(f"dead-lettered: {event}")
                assert isinstance(event, ImageReadyEvent)
                seen.add(event.id)
        elapsed = time.perf_counter() - started
    if strays:
        log.warning("%d events of earlier runs arrived during this run", strays)
    return elapsed


def histogram_totals(histogram: Any) -> tuple[float, float]:
    [metric] = histogram.collect()
    values = {s.name.removeprefix(metric.name): s.value for s in metric.samples}
    return values["_count"], values["_sum"]


async def bench(args: argparse.Namespace, bootstrap: str, blob_dir: str) -> dict[str, Any]:
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=f"bench{os.getpid()}",
        blob_url=blob_dir,
        models=args.profile,
        device=args.device,
    )
    models = GenModels.from_settings(settings)
    generator = Generator(models)
    # Built here, not by genseg.workers: the stage shares its models with the direct path.
    stage = GenStage(settings, generator=generator)
    config = RuntimeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    direct: list[float] = []
    worker: list[float] = []
    # CPU seconds of this process (all threads): less sensitive than wall time to other
    # load on a shared machine. The broker is another process and is not counted.
    direct_cpu: list[float] = []
    worker_cpu: list[float] = []
    async with StageRuntime(stage, settings, config) as rt:
        # Warm up both paths (group join, topic metadata, first-call allocations).
        await run_worker(rt, settings, requests(2, args.size, 2, "warm"), args.timeout)
        run_direct(generator, requests(2, args.size, 2, "warm"), args.max_batch)
        # The fixed cost of one round trip (two consumer fetch waits, publish, commit):
        # paid once per run below, as pipeline fill and drain.
        round_trip = await run_worker(rt, settings, requests(1, args.size, 1, "rtt"), args.timeout)
        count0, sum0 = histogram_totals(rt.metrics.batch_size)
        for r in range(args.repeats):
            events = requests(args.requests, args.size, args.steps, f"r{r}")
            cpu = time.process_time()
            direct.append(run_direct(generator, events, args.max_batch))
            direct_cpu.append(time.process_time() - cpu)
            log.info("direct run %d: %.2f s", r, direct[-1])
            cpu = time.process_time()
            worker.append(await run_worker(rt, settings, events, args.timeout))
            worker_cpu.append(time.process_time() - cpu)
            log.info("worker run %d: %.2f s", r, worker[-1])
        count1, sum1 = histogram_totals(rt.metrics.batch_size)
    n = args.requests
    direct_spi, worker_spi = min(direct) / n, min(worker) / n
    ratio = worker_spi / direct_spi
    return {
        "bench": "gen",
        "profile": args.profile,
        "device": str(models.device),
        "size": args.size,
        "steps": args.steps,
        "requests": n,
        "max_batch": args.max_batch,
        "repeats": args.repeats,
        "direct_s_per_image": round(direct_spi, 4),
        "worker_s_per_image": round(worker_spi, 4),
        "ratio": round(ratio, 3),
        "target_ratio": 1.10,
        "ok": ratio <= 1.10,
        "round_trip_1_step_s": round(round_trip, 3),
        # Throughput without the one-time fill and drain latency of a run (about one
        # round trip: the consumers' fetch waits), which a steady stream does not pay.
        "ratio_excl_round_trip": round((min(worker) - round_trip) / min(direct), 3),
        "direct_cpu_s_per_image": round(min(direct_cpu) / n, 4),
        "worker_cpu_s_per_image": round(min(worker_cpu) / n, 4),
        "cpu_ratio": round(min(worker_cpu) / min(direct_cpu), 3),
        "mean_batch": round((sum1 - sum0) / max(count1 - count0, 1), 2),
        "direct_runs_s": [round(x, 3) for x in direct],
        "worker_runs_s": [round(x, 3) for x in worker],
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="tiny", choices=["tiny", "random", "pretrained"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("aiokafka", "diffusers", "transformers", "consumers", "gen_worker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    print("machine:", json.dumps(machine()))
    with tempfile.TemporaryDirectory(prefix="genseg-bench-") as tmp:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if bootstrap:
            result = asyncio.run(bench(args, bootstrap, tmp))
        else:
            with EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker:
                result = asyncio.run(bench(args, broker.bootstrap_servers, tmp + "/blobs"))
    print(
        f"direct {result['direct_s_per_image']:.4f} s/image, "
        f"worker {result['worker_s_per_image']:.4f} s/image, "
        f"ratio {result['ratio']:.3f} (target <= 1.10; "
        f"{result['ratio_excl_round_trip']:.3f} without one round trip of "
        f"{result['round_trip_1_step_s']:.2f} s), mean batch {result['mean_batch']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
