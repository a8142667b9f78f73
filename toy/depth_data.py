"""Rendered views of the 3D toy world as tensors, for the depth model and the benches."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from toy.world3d import Scene3D, make_scene3d


@dataclass
class ViewData:
    """``images`` ``[N, 64, 64, 3]`` uint8; ``depth`` ``[N, 64, 64]`` float32 z-depth in
    world units (exact, from the renderer)."""

    images: torch.Tensor
    depth: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def _scene(seed: int, layout: str) -> Scene3D:
    return make_scene3d(seed, layout=layout)


def render_scenes(seeds: Sequence[int], layout: str, processes: int = 1) -> list[Scene3D]:
    """The scenes of ``seeds`` (``layout`` ``random``: one view each, ``canonical``: four),
    rendered in ``processes`` worker processes (the same result for any count)."""
    if processes > 1 and len(seeds) > 64:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return pool.map(partial(_scene, layout=layout), seeds, chunksize=32)
    return [_scene(seed, layout) for seed in seeds]


def view_data(scenes: Sequence[Scene3D]) -> ViewData:
    """Every view of ``scenes`` as tensors."""
    views = [v for scene in scenes for v in scene.views]
    return ViewData(
        torch.from_numpy(np.stack([v.image for v in views])),
        torch.from_numpy(np.stack([v.depth for v in views])),
    )


def depth_views(
    random_seeds: Sequence[int], canonical_seeds: Sequence[int], processes: int = 1
) -> ViewData:
    """Random-layout views (geometry anywhere) and canonical views (what the scene
    generator draws), concatenated."""
    scenes = render_scenes(random_seeds, "random", processes)
    scenes += render_scenes(canonical_seeds, "canonical", processes)
    return view_data(scenes)


__all__ = ["ViewData", "depth_views", "render_scenes", "view_data"]
