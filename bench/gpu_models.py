"""Benchmark: the current models on one GPU, one function per model family.

- ``sdxl``: SDXL base with seeded random weights (the ``random`` profile with
  ``GENSEG_SD_ARCH=sdxl``: the full-size architecture, its compute, no download) at
  1024x1024, 30 steps, batches of 1 and 4, with and without heat maps (one target per
  prompt records the cross-attention), fp16 on CUDA: seconds per image.

Each family is a function ``(Options) -> dict`` in :data:`FAMILIES`; ``--only`` picks
some. The last line is one JSON object ``{"bench": "gpu_models", "machine": {...},
"results": {family: {...}}}``.

    python bench/gpu_models.py                          # on a device machine
    python bench/gpu_models.py --device cpu --tiny      # tiny models, seconds, any machine
    python bench/gpu_models.py --only sdxl --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe

log = logging.getLogger("bench.gpu_models")


@dataclass(frozen=True)
class Options:
    """What every family's bench gets: the device, tiny mode, timed repeats per row."""

    device: str = "auto"
    tiny: bool = False
    repeats: int = 2

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """One warm-up call (kernels, allocator), then ``repeats`` timed calls: the best and
    every run in seconds, and the peak GPU memory of the timed calls."""
    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        runs.append(time.perf_counter() - started)
    row: dict[str, Any] = {"best_s": round(min(runs), 4), "runs_s": [round(t, 4) for t in runs]}
    if device.type == "cuda":
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def machine(device: torch.device) -> dict[str, Any]:
    """bench/machine.py's facts, and the GPU's when one runs the bench."""
    info = describe()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


# --- families ----------------------------------------------------------------------------


def bench_sdxl(opts: Options) -> dict[str, Any]:
    """SDXL text-to-image: 1024x1024, 30 steps (tiny: 64x64, 2 steps), batches 1 and 4,
    heat maps off and on; seconds per image."""
    from gen_worker.generate import BatchSpec, Generator, Sample
    from gen_worker.profiles import GenModels, RuntimeOptions
    from plumbing.settings import Settings

    size, steps = (64, 2) if opts.tiny else (1024, 30)
    settings = Settings(models="tiny" if opts.tiny else "random", sd_arch="sdxl")
    started = time.perf_counter()
    models = GenModels.from_settings(settings, RuntimeOptions(device=opts.device))
    load_s = time.perf_counter() - started
    generator = Generator(models)
    log.info("%s on %s loaded in %.1f s", models.name, models.device, load_s)
    spec = BatchSpec(
        mode="txt2img", width=size, height=size, steps=steps, guidance_scale=7.5, sampler="dpmpp_2m"
    )
    rows = []
    for batch in (1, 4):
        for heatmaps in (False, True):
            samples = [
                Sample(
                    prompt=f"a modern minimalist coffee cup on a wooden table, photo {i}",
                    seed=1000 + i,
                    targets=("coffee cup",) if heatmaps else (),
                )
                for i in range(batch)
            ]
            timed = time_calls(
                lambda s=samples: generator.generate(spec, s), models.device, opts.repeats
            )
            row = {
                "batch": batch,
                "heatmaps": heatmaps,
                "s_per_image": round(timed["best_s"] / batch, 4),
                **timed,
            }
            log.info("sdxl batch %d heatmaps %s: %.4f s/image", batch, heatmaps, row["s_per_image"])
            rows.append(row)
    return {
        "model": models.name,
        "device": str(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
        "size": size,
        "steps": steps,
        "sampler": spec.sampler,
        "batch_invariant": generator.batch_invariant,
        "load_s": round(load_s, 2),
        "rows": rows,
    }


#: Model family -> its bench. The segmenter's families (SAM 2.1, SAM 3, SAM ViT-H) join here.
FAMILIES: dict[str, Callable[[Options], dict[str, Any]]] = {"sdxl": bench_sdxl}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models at tiny sizes")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row")
    parser.add_argument(
        "--only", default=",".join(FAMILIES), help=f"families to run, of {','.join(FAMILIES)}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown or not chosen:
        print(
            f"--only {args.only!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(FAMILIES)}",
            file=sys.stderr,
        )
        return 2
    opts = Options(device=args.device, tiny=args.tiny, repeats=args.repeats)
    results = {name: FAMILIES[name](opts) for name in chosen}
    print(
        json.dumps(
            {
                "bench": "gpu_models",
                "tiny": args.tiny,
                "repeats": args.repeats,
                "machine": machine(opts.torch_device()),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
