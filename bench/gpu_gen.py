"""Benchmark: generation throughput of the GPU profile, per batch size.

Defaults: the ``random`` profile (SD 1.5 architectures, random weights: the compute
of the real model, no download) at 512x512, 25 steps, batches of 1, 4 and 8, fp16
on CUDA, with one target per prompt (heat-map recording on, as in production).
Reports, per batch size, seconds per image and images per second as the median of
``--repeats`` timed calls (their spread and the best beside it), the warm-up call's
seconds (with ``--compile``: what compiling costs a worker start) and peak GPU memory;
the last line is one JSON object ``{"bench": "gpu_gen", ...}``. The models run with the
options ``genseg worker`` derives from its settings (``RuntimeOptions.from_settings``):
``--compile`` is ``GENSEG_TORCH_COMPILE``, which also fuses the attention projections
unless ``--xformers`` is on.

    python bench/gpu_gen.py                                   # on a GPU machine
    python bench/gpu_gen.py --device cpu --profile tiny --size 64 --steps 4   # smoke run
    python bench/gpu_gen.py --compile                         # the fast path
    python bench/gpu_gen.py --xformers                        # xFormers attention
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import spread
from gen_worker.generate import BatchSpec, Generator, Sample
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.settings import Settings

log = logging.getLogger("bench.gpu_gen")


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(
    generator: Generator, spec: BatchSpec, batch: int, repeats: int, targets: bool
) -> dict[str, Any]:
    """Time ``repeats`` calls of ``batch`` samples after one warm-up call (timed apart)."""
    device = generator.models.device
    samples = [
        Sample(
            prompt=f"a modern minimalist coffee cup on a wooden table, photo {i}",
            seed=1000 + i,
            targets=("coffee cup",) if targets else (),
        )
        for i in range(batch)
    ]
    synchronize(device)
    started = time.perf_counter()
    generator.generate(spec, samples)  # warm-up: kernels, allocator, compile
    synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        generator.generate(spec, samples)
        synchronize(device)
        times.append(time.perf_counter() - started)
    per_batch = spread(times, 4)
    row: dict[str, Any] = {
        "batch": batch,
        "s_per_image": round(per_batch["median"] / batch, 4),
        "images_per_s": round(batch / per_batch["median"], 3),
        "s_per_batch": per_batch,
        "best_s_per_image": round(per_batch["min"] / batch, 4),
        "warmup_s": round(warmup_s, 2),
    }
    if device.type == "cuda":
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="random", choices=["tiny", "random", "pretrained"])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size")
    parser.add_argument("--no-targets", action="store_true", help="no heat-map recording")
    parser.add_argument("--xformers", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="GENSEG_TORCH_COMPILE: torch.compile the UNet (and fuse its projections)",
    )
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="UNet per sample (the CPU default; off on CUDA unless given)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    settings = Settings(
        models=args.profile,
        device=args.device,
        xformers=args.xformers,
        torch_compile=args.compile,
        batch_invariant=True if args.batch_invariant else None,
    )
    options = RuntimeOptions.from_settings(settings)
    started = time.perf_counter()
    models = GenModels.from_settings(settings, options)
    load_s = time.perf_counter() - started
    generator = Generator(models)
    print("machine:", json.dumps(machine(models.device)))
    print(
        f"profile {models.name} on {models.device} ({str(models.dtype).removeprefix('torch.')}), "
        f"batch-invariant {generator.batch_invariant}, loaded in {load_s:.1f} s"
    )
    spec = BatchSpec(
        mode="txt2img",
        width=args.size,
        height=args.size,
        steps=args.steps,
        guidance_scale=7.5,
        sampler=args.sampler,
    )
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = bench_batch(generator, spec, batch, args.repeats, not args.no_targets)
        rows.append(row)
        mem = f", peak {row['peak_gpu_mem_gib']} GiB" if "peak_gpu_mem_gib" in row else ""
        print(
            f"batch {batch}: {row['s_per_image']:.4f} s/image (median of {args.repeats}), "
            f"{row['images_per_s']:.3f} images/s, warm-up {row['warmup_s']:.1f} s{mem}"
        )
    result = {
        "bench": "gpu_gen",
        "profile": args.profile,
        "model": models.name,
        "device": str(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "sampler": args.sampler,
        "targets": not args.no_targets,
        "xformers": args.xformers,
        "compile": args.compile,
        # Fusion and compile apply on CUDA only (GenModels._prepare).
        "fused_projections": options.fuse_projections and models.device.type == "cuda",
        "batch_invariant": generator.batch_invariant,
        "load_s": round(load_s, 2),
        "results": rows,
        "machine": machine(models.device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
