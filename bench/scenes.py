"""Scene views: the time depth + .glb export add to a view, against segmentation alone.

Measured side by side in one run, on this machine's CPU, tiny profile: ``SegStage.handle``
(blob reads and writes in a local store, SAM, finishing, PNGs) on image-ready events
without a scene, and on the same kind of events as scene views asking for
``["depth", "mesh"]`` (plus the depth model, the depth PNG, the per-object medians and
the textured ``.glb``). The two kinds take turns image by image. Every image is distinct,
so no call gets another's cached SAM embedding. Reports, per image side:

- wall ms per view (median, p95 and minimum) of each kind, the added ms and the ratio
  (the minimum is the least disturbed by other load on a shared machine);
- CPU ms per view (process time, all threads): robust to the machine's other load;
- the handler's own phases of the scene views: ``seg.depth`` (model + PNG + write) and
  ``seg.mesh`` (grid, textures, .glb + write), median ms;
- .glb and depth PNG sizes.

Usage: ``python bench/scenes.py [--images 24] [--sizes 64,512] [--torch-threads 2]``.
The last line printed is one JSON object ``{"bench": "scenes", ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from consumers.stage import StageContext
from plumbing.blobstore import LocalBlobStore, blob_key
from plumbing.images import encode_heatmap, encode_png
from plumbing.settings import Settings
from schemas import AssetReadyEvent, ImageReadyEvent, ResolvedParams, SceneOptions, Topics
from seg_worker import SegStage

log = logging.getLogger("bench.scenes")

TARGETS = ("sofa", "coffee table")


def machine() -> dict[str, object]:
    """What ran the benchmark."""
    return {
        **describe(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank), rounded to 0.01."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[rank], 2)


def make_event(
    store: LocalBlobStore, seed: int, size: int, scene: SceneOptions | None
) -> ImageReadyEvent:
    """A distinct image with two objects and their heat maps, written to the store."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
    s = size // 8
    heatmaps = {}
    request_id = f"bench-{size}-{seed}"
    for k, target in enumerate(TARGETS):
        y, x = rng.integers(0, s - s // 3, 2)
        image[8 * y : 8 * (y + s // 3), 8 * x : 8 * (x + s // 3)] = (200, 40 + 120 * k, 40)
        heat = np.zeros((s, s), np.float32)
        heat[y : y + s // 3, x : x + s // 3] = 1.0
        key = blob_key(request_id, 0, "gen", f"heat-{k}.png")
        heatmaps[target] = store.put(key, encode_heatmap(heat), "image/png")
    image_ref = store.put(
        blob_key(request_id, 0, "gen", "image.png"), encode_png(Image.fromarray(image)), "image/png"
    )
    return ImageReadyEvent(
        id=request_id,
        image=image_ref,
        params=ResolvedParams(
            prompt="a living room with a sofa and a coffee table",
            width=size,
            height=size,
            steps=2,
            guidance_scale=7.5,
            sampler="dpmpp_2m",
            seed=seed,
        ),
        model="tiny",
        heatmaps=heatmaps,
        targets=list(TARGETS),
        # every mask kept, unsmoothed: the tiny SAM's random masks are speckled
        segmentation={"min_confidence": 0.0, "smooth_px": 0},
        scene=scene,
    )


def run(stage: SegStage, store: LocalBlobStore, event: ImageReadyEvent) -> dict[str, float]:
    """One handler call: wall and CPU ms, phases, output sizes."""
    ctx = StageContext(blob=store, topics=Topics("bench"), settings=stage.settings)
    wall, cpu = time.perf_counter(), time.process_time()
    (result,) = stage.handle([event], ctx)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if isinstance(result, BaseException):
        raise result
    # The terminal output: the asset-ready event (a scene view has its record before it).
    asset = next(out.event for out in result if out.terminal)
    assert isinstance(asset, AssetReadyEvent)
    return {
        "wall_ms": wall * 1000,
        "cpu_ms": cpu * 1000,
        "objects": len(asset.assets),
        "depth_ms": asset.timings_ms.get("seg.depth", 0.0),
        "mesh_ms": asset.timings_ms.get("seg.mesh", 0.0),
        "glb_kib": (asset.mesh.bytes / 1024) if asset.mesh else 0.0,
        "depth_png_kib": (asset.depth.bytes / 1024) if asset.depth else 0.0,
    }


def bench_size(stage: SegStage, store: LocalBlobStore, size: int, images: int) -> dict[str, object]:
    """``images`` views of each kind at ``size`` px, taking turns; medians and ratios."""
    scene = SceneOptions(scene_id="bench", view="0", views_total=1, outputs=["depth", "mesh"])
    for warm in range(2):  # first calls build lazily (depth model) and warm up torch
        run(stage, store, make_event(store, 10_000 + warm, size, None))
        run(stage, store, make_event(store, 20_000 + warm, size, scene))
    alone, with_scene = [], []
    for i in range(images):
        pair = [("alone", None), ("scene", scene)]
        if i % 2:
            pair.reverse()  # neither kind always runs first
        for kind, options in pair:
            out = run(stage, store, make_event(store, 2 * i + (kind == "scene"), size, options))
            (alone if kind == "alone" else with_scene).append(out)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    wall_a, wall_s = med(alone, "wall_ms"), med(with_scene, "wall_ms")
    cpu_a, cpu_s = med(alone, "cpu_ms"), med(with_scene, "cpu_ms")
    return {
        "size": size,
        "images": images,
        "alone_wall_ms_p50": wall_a,
        "alone_wall_ms_p95": pct([r["wall_ms"] for r in alone], 95),
        "alone_wall_ms_min": pct([r["wall_ms"] for r in alone], 0),
        "scene_wall_ms_p50": wall_s,
        "scene_wall_ms_p95": pct([r["wall_ms"] for r in with_scene], 95),
        "scene_wall_ms_min": pct([r["wall_ms"] for r in with_scene], 0),
        "added_wall_ms_p50": round(wall_s - wall_a, 2),
        "wall_ratio": round(wall_s / wall_a, 2),
        "alone_cpu_ms_p50": cpu_a,
        "scene_cpu_ms_p50": cpu_s,
        "added_cpu_ms_p50": round(cpu_s - cpu_a, 2),
        "cpu_ratio": round(cpu_s / cpu_a, 2),
        "depth_phase_ms_p50": med(with_scene, "depth_ms"),
        "mesh_phase_ms_p50": med(with_scene, "mesh_ms"),
        "objects_p50": med(with_scene, "objects"),
        "glb_kib_p50": med(with_scene, "glb_kib"),
        "depth_png_kib_p50": med(with_scene, "depth_png_kib"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="views of each kind per size")
    parser.add_argument("--sizes", default="64,512", help="image sides, comma-separated")
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.torch_threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scenes-") as tmp:
        store = LocalBlobStore(Path(tmp) / "blobs")
        stage = SegStage(Settings(blob_url=str(store.root), models="tiny", device="cpu"))
        stage.setup()
        for size in (int(s) for s in args.sizes.split(",")):
            row = bench_size(stage, store, size, args.images)
            results.append(row)
            print(
                f"{size:>4} px: segmentation alone {row['alone_wall_ms_p50']:.1f} ms, "
                f"with depth + .glb {row['scene_wall_ms_p50']:.1f} ms "
                f"(+{row['added_wall_ms_p50']:.1f} ms, x{row['wall_ratio']}); CPU "
                f"{row['alone_cpu_ms_p50']:.1f} -> {row['scene_cpu_ms_p50']:.1f} ms "
                f"(x{row['cpu_ratio']}); phases depth {row['depth_phase_ms_p50']:.1f} ms, "
                f"mesh {row['mesh_phase_ms_p50']:.1f} ms; .glb {row['glb_kib_p50']:.0f} KiB; "
                f"min {row['alone_wall_ms_min']:.1f} -> {row['scene_wall_ms_min']:.1f} ms"
            )
    summary = {"bench": "scenes", "machine": machine(), "results": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
