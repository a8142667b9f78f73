"""The ``toy`` model profile, plugged into both workers from outside.

pyproject.toml declares :data:`GEN_PROFILE` and :data:`SEG_PROFILE` as entry points
(groups ``genseg.gen_profiles`` and ``genseg.seg_profiles``); the workers find them
there and never import this package by name. ``GENSEG_MODELS=toy`` then runs:

- generator: the pipeline trained on :mod:`toy.world` (``python -m toy.train_gen``),
  shipped in ``toy/weights/sd`` (or ``TOY_SD_MODEL``), loaded exactly like
  ``pretrained``; inpainting with the same UNet (diffusers blends the kept region in
  at every step). 64x64 images only: the worker refuses other sizes
  (``unsupported_size``), since the models never saw them;
- scene generator: the views of multi-view scene requests (prompt events with a
  ``scene`` block) are drawn by a second pipeline, trained on the 3D toy world's views
  (``python -m toy.train_scene``), shipped in ``toy/weights/scene_sd`` (or
  ``TOY_SCENE_SD_MODEL``; ``none``: the flat generator draws them);
- segmenter: :data:`TOY_SAM_ARCH` with the weights trained on the toy world
  (``python -m toy.train_sam``), ``toy/weights/sam.safetensors`` unless
  ``SAM_CHECKPOINT`` names another file, loaded strictly like ``pretrained``;
- depth (scene views): the Depth Anything model trained on the 3D toy world's exact
  depth maps (``python -m toy.train_depth``, ``toy/weights/depth``, metric), loaded
  through the ``pretrained`` depth path (``SegProfile.default_depth_model``) unless
  ``DEPTH_MODEL`` names another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gen_worker.registry import GenPipelines, GenProfile
from seg_worker.profiles import SamArch, SegProfile
from toy.scene_weights import DEPTH_DIR, SCENE_SD_DIR
from toy.weights import SAM_WEIGHTS, SD_DIR
from toy.world import WorldConfig

if TYPE_CHECKING:
    import torch

    from gen_worker.profiles import RuntimeOptions
    from plumbing.settings import Settings

#: Side of the toy world's images, pixels: the only size both models were trained at.
SIZE = WorldConfig().size

#: The toy SAM: 64 px input, patch 4 -> 16x16 embedding and 64x64 low-res masks (full
#: resolution for the toy world's 64x64 images). Four encoder blocks of width 64
#: (windows of 8x8 patches, global attention in blocks 2 and 4) and the real two-layer
#: two-way transformer. The shipped weights fit exactly this (strict loading).
TOY_SAM_ARCH = SamArch(
    "toy",
    encoder_embed_dim=64,
    encoder_depth=4,
    encoder_num_heads=4,
    encoder_global_attn_indexes=(1, 3),
    img_size=SIZE,
    patch_size=4,
    window_size=8,
    prompt_embed_dim=64,
    mask_in_chans=16,
    decoder_mlp_dim=256,
    decoder_num_heads=4,
    iou_head_hidden_dim=64,
)


def load_toy_pipelines(
    settings: Settings, options: RuntimeOptions, dtype: torch.dtype
) -> GenPipelines:
    """The toy generator through the ``pretrained`` loading code; inpainting shares its
    components (no inpainting model was trained)."""
    # Imported here, not at the top: the segmenter worker imports this module for
    # SEG_PROFILE and should not import diffusers.
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from gen_worker.profiles import load_pretrained

    def pipelines(source: str, scene: GenPipelines | None = None) -> GenPipelines:
        txt2img = load_pretrained(source, StableDiffusionPipeline, dtype=dtype)
        return GenPipelines(
            name=source,
            txt2img=txt2img,
            inpaint_name=source,
            inpaint_loader=lambda: StableDiffusionInpaintPipeline(
                **{**txt2img.components, "requires_safety_checker": False}
            ),
            scene=scene,
        )

    scene = scene_source(settings)
    return pipelines(
        settings.toy_sd_model or str(SD_DIR), pipelines(scene) if scene is not None else None
    )


def scene_source(settings: Settings) -> str | None:
    """Where the scene generator loads from: ``TOY_SCENE_SD_MODEL``, else the shipped
    weights when there are any; None: none (``none``, or nothing shipped)."""
    source = settings.toy_scene_sd_model
    if source is None:
        return str(SCENE_SD_DIR) if (SCENE_SD_DIR / "model_index.json").is_file() else None
    return None if source.lower() == "none" else source


GEN_PROFILE = GenProfile("toy", load_toy_pipelines, native_size=(SIZE, SIZE))

SEG_PROFILE = SegProfile(
    "toy",
    arch=TOY_SAM_ARCH,
    weights="checkpoint",
    default_checkpoint=str(SAM_WEIGHTS),
    # A 16x16 automatic grid puts a point every 4 px on a 64 px image (a dozen or more
    # inside the smallest toy object), and the stability filter stays: the trained
    # model's logits are sharp, so its masks are stable.
    config={"auto_points_per_side": 16, "auto_stability_thresh": 0.92},
    # Metric depth of the 3D toy world's views, trained on its exact depth maps.
    default_depth_model=str(DEPTH_DIR),
)

__all__ = [
    "GEN_PROFILE",
    "SEG_PROFILE",
    "SIZE",
    "TOY_SAM_ARCH",
    "load_toy_pipelines",
    "scene_source",
]
