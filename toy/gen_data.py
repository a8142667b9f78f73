"""The toy generator's training data: world scenes as tensors, with each caption's
tokens and the object each token names (for the attention loss)."""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTokenizer

from gen_worker.attention import find_token_span
from toy.gen_model import MAX_TOKENS, TrainConfig
from toy.world import WorldConfig, make_scene

log = logging.getLogger(__name__)


@dataclass
class WorldData:
    """The training scenes as tensors.

    ``images``: ``[N, 3, 64, 64]`` float32 in -1..1; ``ids``: ``[N, L]`` caption token
    ids; ``token_object``: ``[N, L]`` int64, which object (0..2) a token names, -1 for
    none; ``masks``: ``[N, 3, 16, 16]`` float32, each object's coverage of every
    latent cell (the resolution of the largest cross-attention layer).
    """

    images: torch.Tensor
    ids: torch.Tensor
    token_object: torch.Tensor
    masks: torch.Tensor
    empty_ids: torch.Tensor  # [L]: the empty caption (unconditional)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 RGB -> ``[N, 3, H, W]`` float32 in -1..1 (what the VAE takes)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_data(
    count: int, tokenizer: CLIPTokenizer, world: WorldConfig | None = None, processes: int = 1
) -> WorldData:
    world = world or WorldConfig()
    if processes > 1:
        with multiprocessing.Pool(processes) as pool:
            scenes = pool.map(partial(make_scene, config=world), range(count), chunksize=256)
    else:
        scenes = [make_scene(i, world) for i in range(count)]
    images = np.empty((count, world.size, world.size, 3), np.uint8)
    ids = np.empty((count, MAX_TOKENS), np.int64)
    token_object = np.full((count, MAX_TOKENS), -1, np.int64)
    # Masks are pooled to the 16x16 cells one object at a time: full-size masks of
    # 20,000 scenes would take 1 GB. Coverage is a multiple of 1/factor^2, exact in float32.
    factor = world.size // 16
    cells = np.zeros((count, world.max_objects, 16, 16), np.float32)
    for i, scene in enumerate(scenes):
        images[i] = scene.image
        row = tokenizer(
            scene.caption, padding="max_length", max_length=MAX_TOKENS, truncation=True
        ).input_ids
        ids[i] = row
        for k, obj in enumerate(scene.objects):
            cells[i, k] = obj.mask.reshape(16, factor, 16, factor).mean(axis=(1, 3))
            token_object[i, find_token_span(tokenizer, row, obj.name)] = k
    empty = tokenizer("", padding="max_length", max_length=MAX_TOKENS).input_ids
    return WorldData(
        to_pixels(images),
        torch.from_numpy(ids),
        torch.from_numpy(token_object),
        torch.from_numpy(cells),
        torch.tensor(empty),
    )


def load_or_build_data(cfg: TrainConfig, tokenizer: CLIPTokenizer) -> WorldData:
    """The world of ``cfg``, from ``cfg.world_cache`` when it holds the same number of scenes."""
    cache = Path(cfg.world_cache) if cfg.world_cache else None
    if cache is not None and cache.is_file():
        data = WorldData(**torch.load(cache, weights_only=True))
        if len(data.images) == cfg.scenes:
            log.info("world loaded from %s", cache)
            return data
    data = build_data(cfg.scenes, tokenizer, processes=cfg.threads)
    if cache is not None:
        torch.save(vars(data), cache)
    return data
