"""SAM encoder and decoder latency and peak memory per dtype (random weights, no download).

On a GPU (default): ViT-H at its real 1024 px input, fp16 and bf16, plus the
encoder at a larger batch (``--batch``) to show what batching images buys
(per-image encoder time at batch 1 vs batch N). The decoder is timed per prompt
(prompt encoder + mask decoder + upsampling of the three masks to 1024 px), on
an embedding computed once: the cached path of the worker.

On a CPU, to know the script works: ``python bench/gpu_seg.py --device cpu
--arch vit_b --dtypes fp32,bf16 --iters 2 --warmup 1 --batch 1`` (peak memory is
then the process's peak RSS, not an allocator figure).

The last line printed is one JSON object ``{"bench": "gpu_seg", ...}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg_worker.profiles import ARCHS, build_sam

log = logging.getLogger("bench.gpu_seg")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Wall times in ms of ``iters`` calls after ``warmup`` calls, synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "min": round(ordered[0], 2),
        "max": round(ordered[-1], 2),
    }


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "device": str(device),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


@torch.inference_mode()
def bench_dtype(
    arch: str, name: str, device: torch.device, args: argparse.Namespace
) -> dict[str, object]:
    dtype = DTYPES[name]
    gc.collect()  # the previous dtype's model goes before this one's peak is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_sam(arch).to(device=device, dtype=dtype)
    # SAM's prompt encoder casts point coordinates to fp32 itself: it stays fp32 (it is
    # tiny), and its outputs are cast to the decoder's dtype.
    model.prompt_encoder.float()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    encoder = torch.compile(model.image_encoder) if args.compile else model.image_encoder
    size = model.image_encoder.img_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def image_batch(n: int) -> torch.Tensor:
        pixels = torch.randint(0, 256, (n, 3, size, size), generator=gen).to(device)
        return model.preprocess(pixels.to(dtype))  # normalise (and pad: already square)

    x1 = image_batch(1)
    encode_ms = timed(lambda: encoder(x1), device, args.iters, args.warmup)
    features = encoder(x1)
    result: dict[str, object] = {"encoder_ms": stats(encode_ms)}
    if args.batch > 1:
        xb = image_batch(args.batch)
        batch_ms = timed(lambda: encoder(xb), device, args.iters, args.warmup)
        per_image = [t / args.batch for t in batch_ms]
        result[f"encoder_batch{args.batch}_per_image_ms"] = stats(per_image)
        result["batching_speedup"] = round(
            statistics.median(encode_ms) / statistics.median(per_image), 2
        )
        del xb

    box = torch.tensor([[size * 0.25, size * 0.25, size * 0.6, size * 0.7]], device=device)
    point = torch.tensor([[[size * 0.4, size * 0.45]]], device=device)
    label = torch.ones((1, 1), dtype=torch.int, device=device)
    dense_pe = model.prompt_encoder.get_dense_pe().to(dtype)

    def decode() -> torch.Tensor:
        sparse, dense = model.prompt_encoder(points=(point, label), boxes=box, masks=None)
        low_res, _ = model.mask_decoder(
            image_embeddings=features,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
        )
        return model.postprocess_masks(low_res, (size, size), (size, size))

    result["decoder_ms"] = stats(timed(decode, device, args.iters * 5, args.warmup))
    result["peak_memory_mib"] = peak_memory_mib(device)
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return result


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--arch", default="vit_h", choices=sorted(ARCHS))
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp32, fp16, bf16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="also time the encoder at batch N")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = machine(device)
    print(f"machine: {info}")
    results: dict[str, object] = {}
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        try:
            results[name] = bench_dtype(args.arch, name, device, args)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a dtype this device lacks
            log.warning("%s failed: %s", name, exc)
            results[name] = {"error": str(exc)[:300]}
        print(f"{args.arch} {name}: {results[name]}", flush=True)
    print(
        json.dumps(
            {
                "bench": "gpu_seg",
                "arch": args.arch,
                "input_px": ARCHS[args.arch].img_size,
                "iters": args.iters,
                "batch": args.batch,
                "compile": args.compile,
                "machine": info,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
