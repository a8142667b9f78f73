"""Benchmark: generation throughput of the GPU profile, per batch size.

Defaults: the ``random`` profile (SD 1.5 architectures, random weights: the compute
of the real model, no download) at 512x512, 25 steps, batches of 1, 4 and 8, fp16
on CUDA, with one target per prompt (heat-map recording on, as in production).
Reports seconds per image, images per second and peak GPU memory per batch size;
the last line is one JSON object ``{"bench": "gpu_gen", ...}``.

    python bench/gpu_gen.py                                   # on a GPU machine
    python bench/gpu_gen.py --device cpu --profile tiny --size 64 --steps 4   # smoke run
    python bench/gpu_gen.py --xformers --compile              # the optional speed-ups
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
    """Time ``repeats`` calls of ``batch`` samples after one warm-up call."""
    device = generator.models.device
    samples = [
        Sample(
            prompt=f"a modern minimalist coffee cup on a wooden table, photo {i}",
            seed=1000 + i,
            targets=("coffee cup",) if targets else (),
        )
        for i in range(batch)
    ]
    generator.generate(spec, samples)  # warm-up: kernels, allocator, compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        generator.generate(spec, samples)
        synchronize(device)
        times.append(time.perf_counter() - started)
    best = min(times)
    row: dict[str, Any] = {
        "batch": batch,
        "s_per_image": round(best / batch, 4),
        "images_per_s": round(batch / best, 3),
        "s_per_batch": round(best, 4),
        "runs_s": [round(t, 4) for t in times],
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-targets", action="store_true", help="no heat-map recording")
    parser.add_argument("--xformers", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="UNet per sample (the CPU default; off on CUDA unless given)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    options = RuntimeOptions(
        device=args.device,
        xformers=args.xformers,
        compile=args.compile,
        batch_invariant=True if args.batch_invariant else None,
    )
    started = time.perf_counter()
    models = GenModels.from_settings(Settings(models=args.profile), options)
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
            f"batch {batch}: {row['s_per_image']:.4f} s/image, "
            f"{row['images_per_s']:.3f} images/s{mem}"
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
        "batch_invariant": generator.batch_invariant,
        "load_s": round(load_s, 2),
        "results": rows,
        "machine": machine(models.device),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
