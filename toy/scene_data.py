"""The scene generator's training data: canonical views of the 3D toy world as tensors,
with each view caption's tokens and the solid each token names (for the attention loss)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import CLIPTokenizer

from gen_worker.attention import find_token_span
from toy.depth_data import render_scenes
from toy.gen_data import WorldData, to_pixels
from toy.scene_model import SCENE_MAX_TOKENS
from toy.world3d import Scene3D, draw_items, held_out

#: One row per view (a solid's "object" index is its place in the caption): the flat
#: world's tensors, so that the flat generator's training code runs on them.
SceneData = WorldData


def training_seeds(count: int, start: int = 0) -> list[int]:
    """The first ``count`` seeds from ``start`` whose scene is not held out."""
    seeds: list[int] = []
    seed = start
    while len(seeds) < count:
        # the solids are the scene's first draw: no need to render to know them
        if not held_out(draw_items(np.random.default_rng(seed))):
            seeds.append(seed)
        seed += 1
    return seeds


def scene_data(
    scenes: Sequence[Scene3D], tokenizer: CLIPTokenizer, *, max_solids: int = 3
) -> SceneData:
    """Every view of ``scenes`` as training rows."""
    rows = [(scene, i) for scene in scenes for i in range(len(scene.views))]
    n = len(rows)
    images = np.empty((n, 64, 64, 3), np.uint8)
    ids = np.empty((n, SCENE_MAX_TOKENS), np.int64)
    token_object = np.full((n, SCENE_MAX_TOKENS), -1, np.int64)
    cells = np.zeros((n, max_solids, 16, 16), np.float32)
    for r, (scene, i) in enumerate(rows):
        view = scene.views[i]
        images[r] = view.image
        row = tokenizer(
            scene.view_caption(i),
            padding="max_length",
            max_length=SCENE_MAX_TOKENS,
            truncation=True,
        ).input_ids
        ids[r] = row
        factor = view.image.shape[0] // 16
        for k, solid in enumerate(scene.solids):
            cells[r, k] = view.masks[k].reshape(16, factor, 16, factor).mean(axis=(1, 3))
            token_object[r, find_token_span(tokenizer, row, solid.name)] = k
    empty = tokenizer("", padding="max_length", max_length=SCENE_MAX_TOKENS).input_ids
    return SceneData(
        to_pixels(images),
        torch.from_numpy(ids),
        torch.from_numpy(token_object),
        torch.from_numpy(cells),
        torch.tensor(empty),
    )


def build_scene_data(count: int, tokenizer: CLIPTokenizer, processes: int = 1) -> SceneData:
    """``count`` canonical training scenes (four views each) as rows."""
    scenes = render_scenes(training_seeds(count), "canonical", processes)
    return scene_data(scenes, tokenizer)


__all__ = ["SceneData", "build_scene_data", "scene_data", "training_seeds"]
