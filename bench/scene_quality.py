"""Benchmark: the toy world's scene path, depth and multi-view generation (issue 16).

1. **Depth**: the toy depth model (loaded through the ``pretrained`` depth path,
   :func:`seg_worker.depth.load_depth`) on held-out rendered views of the 3D toy world
   (evaluation seeds): AbsRel (mean of ``|pred - true| / true`` over every pixel) and
   the share of pixels within 1.25x, on random layouts and on canonical scenes (what
   the scene generator draws).
2. **Generated scenes**: held-out combinations of solids, four views each from the
   toy scene generator at the contract's defaults (25 steps, CFG 7.5, DPM++ 2M), one
   seed per scene: the share of targets found in at least 3 of the 4 views, and the
   spread of each target's back-projected 3D position across views relative to the
   scene's size (:mod:`toy.scene_quality`).

Prints the machine, a summary, and as the last line one JSON object
``{"bench": "scene_quality", ...}``.

    python bench/scene_quality.py                            # shipped weights
    python bench/scene_quality.py --scenes 4 --depth-views 8  # the CI smoke size
    python bench/scene_quality.py --sd /tmp/ssd --depth /tmp/depth --sheet /tmp/s.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe, load_average
from gen_worker.generate import Generator
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.settings import Settings
from seg_worker.depth import load_depth
from toy import scene_quality
from toy.depth_data import depth_views
from toy.depth_eval import depth_errors
from toy.scene_weights import DEPTH_DIR, SCENE_SD_DIR
from toy.world3d import EVAL_SEED_BASE

log = logging.getLogger("bench.scene_quality")


def sheet(images: list[np.ndarray], rows: int = 8) -> Image.Image:
    """The first ``rows`` scenes' four views side by side, 3x enlarged."""
    count = min(rows, len(images) // 4)
    grid = np.concatenate(
        [np.concatenate(images[4 * r : 4 * r + 4], axis=1) for r in range(count)], axis=0
    )
    picture = Image.fromarray(grid)
    return picture.resize((picture.width * 3, picture.height * 3), Image.Resampling.NEAREST)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=100, help="generated scenes (4 views)")
    parser.add_argument("--depth-views", type=int, default=200, help="held-out random views")
    parser.add_argument("--sd", default=str(SCENE_SD_DIR), help="scene generator directory")
    parser.add_argument("--depth", default=str(DEPTH_DIR), help="depth model directory")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sheet", type=Path, help="write the first 8 scenes' views here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    print(json.dumps({"machine": describe()}))
    started = time.monotonic()

    estimator = load_depth("pretrained", args.depth)
    random_views = depth_views(
        range(EVAL_SEED_BASE, EVAL_SEED_BASE + args.depth_views), (), processes=args.threads
    )
    canonical = max(1, args.depth_views // 8)
    canonical_views = depth_views(
        (), range(EVAL_SEED_BASE, EVAL_SEED_BASE + canonical), processes=args.threads
    )
    depth = {
        "random_layouts": depth_errors(estimator, random_views),
        "canonical_scenes": depth_errors(estimator, canonical_views),
    }
    depth_s = time.monotonic() - started
    print(f"depth: {depth} ({depth_s:.0f} s)")

    # The scene generator as the generator (the bench calls it directly, not the stage).
    settings = Settings(models="toy", toy_sd_model=args.sd, toy_scene_sd_model="none", device="cpu")
    generator = Generator(GenModels.from_settings(settings, RuntimeOptions(device="cpu")))
    params = scene_quality.GenParams(args.steps, args.guidance, args.sampler)
    scenes = scene_quality.eval_scenes(args.scenes)
    gen_started = time.monotonic()

    def progress(done: int, total: int) -> None:
        rate = done / (time.monotonic() - gen_started)
        print(f"{done}/{total} scenes ({rate:.2f}/s)", file=sys.stderr, flush=True)

    images: list[np.ndarray] = []
    outcomes = scene_quality.run(generator, estimator, scenes, params, progress, images)
    if args.verbose:
        for o in outcomes:
            print(json.dumps(vars(o)))
    if args.sheet:
        sheet(images).save(args.sheet)
    figures = scene_quality.summarise(outcomes)
    found = figures["found_in_3_of_4"]
    spread = figures["spread"]
    print(
        f"scenes {len(scenes)}  targets {figures['targets']}  found in >= 3 of 4 views "
        f"{found['mean']:.3f} +- {found['ci95']:.3f}  spread / scene size: mean "
        f"{spread['mean']:.3f} (median {spread['median']}, p90 {spread['p90']}, n={spread['n']})"
    )
    result: dict[str, object] = {
        "bench": "scene_quality",
        "depth": depth,
        "generated": figures,
        "scenes": len(scenes),
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "sampler": args.sampler,
        "sd": os.path.relpath(args.sd),
        "depth_model": os.path.relpath(args.depth),
        "wall_s": round(time.monotonic() - started, 1),
        "load_average": load_average(),
        "machine": describe(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
