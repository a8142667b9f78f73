"""Benchmark: the whole pipeline on one GPU, against the same work as direct calls.

One process holds the embedded tansu broker's client, a gen and a seg
:class:`~consumers.runtime.StageRuntime` at ``genseg worker``'s default configurations
(the broker is a process of its own), and the direct code; both sides share the same
loaded models on one device. ``random`` profiles by default: SD 1.5 architecture with
seeded random weights, fp16 on CUDA, 512x512, 25 steps, DPM++ 2M, one target per prompt
(cross-attention heat maps on); SAM ViT-H with random weights at the seg worker's
default precision (``GENSEG_SEG_DTYPE=auto``: bf16 autocast on CUDA; ``--sam-dtype``
sets another). Phases, each measured side by side:

- **latency**: ``--latency-requests`` requests one at a time. Pipeline: seconds from
  the client's publish until it reads the request's asset-ready event (p50, p95).
  Direct: ``Generator.generate`` of the one image, then ``Segmenter.segment`` and the
  mask and RGBA PNG encodings, in memory;
- **saturation**: ``--saturation-requests`` (64) requests at once. Pipeline: published
  together, timed until the client has read the last asset-ready event. Direct: the
  two-thread code of ``bench/pipeline.py`` (a generator thread in batches of the gen
  worker's default ``max_batch``, 4, feeding a segmenter thread through a queue).
  Throughput ratio pipeline / direct (the issue's target: >= 0.9).

The runtimes exist only during pipeline phases (they join before the clock), so the
direct phases run beside nothing of the pipeline. The GPU's busy share is sampled
every 100 ms during each phase (NVML through ``pynvml`` when installed, else
``nvidia-smi``; null on a machine without either). Every phase also records the
machine's other load. The asset-ready events' ``timings_ms`` (per-phase times of the
gen and seg handlers) are summarised as medians.

``--compile`` turns on ``GENSEG_TORCH_COMPILE`` as ``genseg worker`` would: the UNet
with its heat-map recorder inside the graph (once per request shape) and SAM's image
encoder (once per batch size), checked on the CPU by tests/test_compile.py;
``first_request_s`` and ``first_batch_s`` in the JSON hold what compiling costs once
per worker start; it also fuses the UNet's attention projections. Not done here: CUDA
graphs; never run on a GPU yet.

    python bench/gpu_pipeline.py                       # on a GPU machine
    python bench/gpu_pipeline.py --device cpu --tiny   # tiny models, 64 px: the script works

The last line printed is one JSON object ``{"bench": "gpu_pipeline", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaProducer

from bench.harness import on_broker, quiet_logs
from bench.machine import LoadMeter, describe, load_average, spread
from bench.pipeline import (
    PARTITIONS,
    Direct,
    Outcomes,
    client_producer,
    publish,
    wait_assigned,
)
from consumers.runtime import StageRuntime
from gen_worker.generate import Generator
from gen_worker.handler import GenStage
from gen_worker.profiles import GenModels
from genseg.workers import running, runtime_config
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from schemas import PromptEvent
from seg_worker import SegStage
from seg_worker.profiles import SEG_DTYPES

log = logging.getLogger("bench.gpu_pipeline")

TARGET_THROUGHPUT_RATIO = 0.9
TARGET_P50_S = 1.0


# --- the GPU's busy share ---------------------------------------------------------------


class GpuSampler:
    """Samples the GPU's utilisation (the share of time a kernel ran) every ``period_s``
    in a thread while open; ``share`` is the mean, None without NVML or nvidia-smi."""

    def __init__(self, index: int = 0, period_s: float = 0.1) -> None:
        self.index, self.period_s = index, period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self) -> Any:
        try:
            import pynvml  # optional: the nvidia-ml-py package

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        command = [smi, f"--id={self.index}", *query]

        def read() -> float | None:
            done = subprocess.run(command, capture_output=True, text=True, timeout=5)
            text = done.stdout.strip()
            return float(text) if done.returncode == 0 and text else None

        try:
            return read if read() is not None else None
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    @property
    def available(self) -> bool:
        return self._read is not None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(Exception):
                value = self._read()
                if value is not None:
                    self.samples.append(value)

    def __enter__(self) -> GpuSampler:
        self.samples = []
        if self._read is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def share(self) -> float | None:
        """Mean utilisation over the block, 0..1 (None: not measured)."""
        return round(statistics.fmean(self.samples) / 100, 3) if self.samples else None


# --- the models ---------------------------------------------------------------------------


def load_models(settings: Settings) -> tuple[Direct, torch.device]:
    """The generator and the seg stage as ``genseg worker`` builds them from ``settings``
    (SAM's precision included: ``GENSEG_SEG_DTYPE``), shared by both sides."""
    generator = Generator(GenModels.from_settings(settings))
    seg = SegStage(settings)
    seg.setup()
    return Direct(generator, seg), generator.models.device


def sam_dtype_name(seg: SegStage) -> str:
    """The precision SAM runs in (``fp32`` for a backend without autocast)."""
    dtype = getattr(seg.predictor, "dtype", None)
    return next(name for name, value in SEG_DTYPES.items() if value is dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- requests -----------------------------------------------------------------------------


def request(request_id: str, seed: int, args: argparse.Namespace) -> PromptEvent:
    return PromptEvent(
        id=request_id,
        prompt=f"a modern minimalist coffee cup on a wooden table, photo {seed}",
        targets=["coffee cup"],
        width=args.size,
        height=args.size,
        steps=args.steps,
        sampler=args.sampler,
        seed=seed,
        segmentation={"min_confidence": 0.0},  # random weights never score high
    )


def requests(tag: str, count: int, seed0: int, args: argparse.Namespace) -> list[PromptEvent]:
    return [request(f"{tag}-{i:03d}", seed0 + i, args) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    return {
        "p50_s": round(percentile(seconds, 50), 4),
        "p95_s": round(percentile(seconds, 95), 4),
        "all_s": [round(s, 4) for s in seconds],
    }


def timing_medians(assets: list[bytes]) -> dict[str, float]:
    """Median milliseconds per handler phase over the asset-ready events' ``timings_ms``."""
    per_phase: dict[str, list[float]] = {}
    for value in assets:
        for name, ms in json.loads(value).get("timings_ms", {}).items():
            per_phase.setdefault(name, []).append(ms)
    return {name: round(statistics.median(v), 1) for name, v in sorted(per_phase.items())}


# --- the two sides ------------------------------------------------------------------------


@contextlib.contextmanager
def measured(roles: dict[str, list[int]], gpu: GpuSampler) -> Iterator[dict[str, Any]]:
    """Load meter and GPU sampler around a block; fills the yielded dict after it."""
    out: dict[str, Any] = {}
    with LoadMeter(roles) as meter, gpu:
        yield out
    out.update(meter.report())
    out["gpu_busy_share"] = gpu.share


class PipelineSide:
    """The gen and seg runtimes and the client, started for a phase and stopped after."""

    def __init__(self, settings: Settings, direct: Direct, timeout: float) -> None:
        self.settings, self.direct, self.timeout = settings, direct, timeout

    def runtimes(self) -> list[StageRuntime]:
        stages: list[Any] = [GenStage(self.settings, generator=self.direct.generator)]
        stages.append(self.direct.seg)
        return [
            StageRuntime(stage, self.settings, runtime_config(stage, create_topics=False))
            for stage in stages
        ]

    @contextlib.asynccontextmanager
    async def started(self) -> Any:
        runtimes = self.runtimes()
        async with running(runtimes), client_producer(self.settings) as producer:
            for rt in runtimes:  # joined before any clock starts
                await wait_assigned(rt, self.timeout)
            yield producer

    async def one(self, producer: AIOKafkaProducer, event: PromptEvent) -> tuple[float, bytes]:
        """Seconds from publishing ``event`` until its asset-ready event was read."""
        async with Outcomes(self.settings, ["assets", "dlq"]) as outcomes:
            started = time.perf_counter()
            await publish(producer, self.settings, [event])
            await outcomes.wait({event.id}, self.settings.topics.assets, self.timeout)
            return outcomes.read_at - started, outcomes.values[0]

    async def many(
        self, producer: AIOKafkaProducer, events: list[PromptEvent]
    ) -> tuple[float, list[bytes]]:
        """Seconds from the first publish until the last asset-ready event was read."""
        async with Outcomes(self.settings, ["assets", "dlq"]) as outcomes:
            started = time.perf_counter()
            await publish(producer, self.settings, events)
            await outcomes.wait({e.id for e in events}, self.settings.topics.assets, self.timeout)
            return outcomes.read_at - started, list(outcomes.values)


def direct_one(direct: Direct, event: PromptEvent, device: torch.device) -> float:
    started = time.perf_counter()
    [(_, result)] = direct.generate([event])
    direct.segment(event, result)
    sync(device)
    return time.perf_counter() - started


# --- main -----------------------------------------------------------------------------------


async def bench(
    args: argparse.Namespace, bootstrap: str, blob_dir: str, broker_pid: int | None
) -> dict[str, Any]:
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=f"benchg{os.getpid()}",
        blob_url=blob_dir,
        models="tiny" if args.tiny else args.profile,
        device=args.device,
        torch_compile=args.compile,
        seg_dtype=args.sam_dtype,
    )
    await ensure_topics(settings, partitions=PARTITIONS)
    started = time.perf_counter()
    direct, device = load_models(settings)
    load_s = time.perf_counter() - started
    log.info("models loaded on %s in %.1f s", device, load_s)
    pipeline = PipelineSide(settings, direct, args.timeout)
    max_batch = int(GenStage.runtime_defaults.get("max_batch", 1))
    roles = {"bench": [os.getpid()], "broker": [broker_pid] if broker_pid else []}
    gpu = GpuSampler()
    out: dict[str, Any] = {
        "bench": "gpu_pipeline",
        "device": str(device),
        "models": {
            "gen": direct.generator.models.name,
            "segmenter": direct.seg.segmenter_id,
        },
        "size": args.size,
        "steps": args.steps,
        "sampler": args.sampler,
        "sam_dtype": sam_dtype_name(direct.seg),
        "gen_dtype": str(direct.generator.models.dtype).removeprefix("torch."),
        "torch_compile": args.compile,
        "gen_max_batch": max_batch,
        "model_load_s": round(load_s, 1),
        "gpu_sampler": gpu.available,
    }

    # Warm-up of both sides: kernels, allocator, autotuning (and compilation: with
    # --compile the first request compiles the batch-1 shape, the first full batch the
    # batch shape; their seconds are what a worker start pays once).
    started = time.perf_counter()
    for i in range(args.warmup):
        first = time.perf_counter()
        direct_one(direct, request(f"warm-d{i}", 10 + i, args), device)
        if i == 0:
            out["first_request_s"] = round(time.perf_counter() - first, 1)
    first = time.perf_counter()
    await asyncio.to_thread(direct.two_threads, requests("warm-b", max_batch, 20, args), max_batch)
    out["first_batch_s"] = round(time.perf_counter() - first, 1)
    async with pipeline.started() as producer:
        for i in range(args.warmup):
            await pipeline.one(producer, request(f"warm-p{i}", 30 + i, args))
    out["warmup_s"] = round(time.perf_counter() - started, 1)

    # Latency: one request at a time, direct first, then the pipeline.
    n = args.latency_requests
    events = requests("lat-d", n, 1000, args)
    with measured(roles, gpu) as direct_load:
        direct_s = [await asyncio.to_thread(direct_one, direct, e, device) for e in events]
    events = requests("lat-p", n, 1000, args)  # the same seeds: the same work
    pipeline_s: list[float] = []
    assets: list[bytes] = []
    async with pipeline.started() as producer:
        with measured(roles, gpu) as pipeline_load:
            for event in events:
                seconds, asset = await pipeline.one(producer, event)
                pipeline_s.append(seconds)
                assets.append(asset)
    direct_lat, pipeline_lat = latency_summary(direct_s), latency_summary(pipeline_s)
    out["latency"] = {
        "requests": n,
        "direct": {**direct_lat, **direct_load},
        "pipeline": {**pipeline_lat, **pipeline_load},
        "added_p50_s": round(pipeline_lat["p50_s"] - direct_lat["p50_s"], 4),
        "pipeline_timings_ms": timing_medians(assets),
        "target_p50_s": TARGET_P50_S,
        "ok": pipeline_lat["p50_s"] <= TARGET_P50_S,
    }
    log.info("latency: %s", json.dumps(out["latency"]))

    # Saturation: every request at once, the pipeline first, then the direct code.
    n = args.saturation_requests
    async with pipeline.started() as producer:
        with measured(roles, gpu) as pipeline_load:
            pipeline_total, assets = await pipeline.many(producer, requests("sat-p", n, 5000, args))
    events = requests("sat-d", n, 5000, args)
    with measured(roles, gpu) as direct_load:
        direct_total, _ = await asyncio.to_thread(direct.two_threads, events, max_batch)
        sync(device)
    ratio = direct_total / pipeline_total
    out["saturation"] = {
        "requests": n,
        "direct": {
            "s": round(direct_total, 3),
            "req_per_s": round(n / direct_total, 3),
            **direct_load,
        },
        "pipeline": {
            "s": round(pipeline_total, 3),
            "req_per_s": round(n / pipeline_total, 3),
            **pipeline_load,
        },
        "throughput_ratio": round(ratio, 3),
        "pipeline_timings_ms": timing_medians(assets),
        "target_ratio": TARGET_THROUGHPUT_RATIO,
        "ok": ratio >= TARGET_THROUGHPUT_RATIO,
    }
    log.info("saturation: %s", json.dumps(out["saturation"]))
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out["load_avg_after"] = load_average()
    out["other_load_cores"] = spread(
        [
            side.get("other_load_cores") or 0.0
            for phase in (out["latency"], out["saturation"])
            for side in (phase["direct"], phase["pipeline"])
        ],
        2,
    )
    return out


def machine(device: str) -> dict[str, Any]:
    info = describe()
    if torch.cuda.is_available() and device != "cpu":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny profiles, 64 px, 4 steps")
    parser.add_argument("--profile", default="random", choices=["random", "pretrained"])
    parser.add_argument("--size", type=int, default=None, help="default 512 (tiny: 64)")
    parser.add_argument("--steps", type=int, default=None, help="default 25 (tiny: 4)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument(
        "--sam-dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="GENSEG_SEG_DTYPE (default auto: bf16 on CUDA, fp32 on the CPU)",
    )
    parser.add_argument("--latency-requests", type=int, default=None, help="default 10 (tiny: 3)")
    parser.add_argument(
        "--saturation-requests", type=int, default=None, help="default 64 (tiny: 8)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="requests per side first")
    parser.add_argument(
        "--compile", action="store_true", help="GENSEG_TORCH_COMPILE (untried on a GPU)"
    )
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    tiny = args.tiny
    args.size = args.size or (64 if tiny else 512)
    args.steps = args.steps or (4 if tiny else 25)
    args.latency_requests = args.latency_requests or (3 if tiny else 10)
    args.saturation_requests = args.saturation_requests or (8 if tiny else 64)
    if tiny:
        args.warmup = min(args.warmup, 1)
    quiet_logs()

    info = machine(args.device)
    print("machine:", json.dumps(info))
    result = on_broker(lambda bootstrap, blobs, pid: bench(args, bootstrap, blobs, pid))
    result["machine"] = info
    lat, sat = result["latency"], result["saturation"]
    p, d = lat["pipeline"], lat["direct"]
    print(
        f"latency p50/p95: pipeline {p['p50_s']:.3f}/{p['p95_s']:.3f} s, "
        f"direct {d['p50_s']:.3f}/{d['p95_s']:.3f} s; saturation "
        f"{sat['pipeline']['req_per_s']:.2f} vs {sat['direct']['req_per_s']:.2f} req/s: ratio "
        f"{sat['throughput_ratio']:.3f} (target >= {TARGET_THROUGHPUT_RATIO})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
