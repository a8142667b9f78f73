"""Train the toy scene generator: a Stable Diffusion pipeline that draws a view of a 3D
toy scene from its caption and view ("a red cube and a blue sphere, view from 45
degrees"), on the CPU.

The classes of the flat toy generator (:mod:`toy.scene_model`), its own vocabulary
(view words) and prompt length, and its training code (:mod:`toy.train_gen`: the VAE
with edge-weighted reconstruction, then text encoder and UNet with the attention loss,
bf16 autocast), run on the 3D world:

1. the world: ``scenes`` canonical scenes of :mod:`toy.world3d`, four views each (held-out
   combinations of solids skipped: the benchmark draws those);
2. the VAE, then every view encoded once (unit-variance latents);
3. text encoder + UNet: the plain v-loss (min-SNR weights cost most placements: see
   :class:`~toy.scene_model.SceneTrainConfig`), 10 % empty captions, EMA, and the
   attention loss (each solid's tokens attend inside its mask *in that view*), so the
   worker's heat maps point at the solid the target names.

Saved with ``save_pretrained`` (fp16 weights), it loads through the ``pretrained`` code.

    python -m toy.train_scene --out toy/weights/scene_sd     # the shipped weights
    python -m toy.train_scene --out /tmp/ssd --scenes 16 --vae-steps 4 --unet-steps 4
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: idle worker threads sleep instead of spinning (see
# toy/train_gen.py: on 2 shared cores spinning made steps many times slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from toy.recipe import recipe_main
from toy.scene_data import build_scene_data
from toy.scene_model import SceneTrainConfig, build_scene_models, scene_tokenizer
from toy.train_gen import train_on
from toy.world3d import SOLIDS

log = logging.getLogger(__name__)


def train(out: Path, cfg: SceneTrainConfig | None = None) -> StableDiffusionPipeline:
    """Render the world, run the flat recipe's phases on it (:func:`toy.train_gen.train_on`)
    and save the pipeline to ``out`` (a diffusers directory)."""
    cfg = cfg or SceneTrainConfig()
    # CPU kernels are deterministic for a fixed thread count.
    torch.set_num_threads(cfg.threads)
    tokenizer = scene_tokenizer()
    models = build_scene_models(tokenizer, cfg)
    log.info("phase: world: %d canonical scenes", cfg.scenes)
    data = build_scene_data(cfg.scenes, tokenizer, processes=cfg.threads)
    return train_on(out, cfg, tokenizer, models, data, shapes=SOLIDS)


def main(argv: Sequence[str] | None = None) -> None:
    recipe_main(argv, __doc__, SceneTrainConfig, train, "output diffusers directory")


if __name__ == "__main__":
    main()
