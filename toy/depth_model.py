"""What the toy depth model is: a small Depth Anything (the transformers classes) that
predicts **metric** depth of the 3D toy world's 64x64 views, and its recipe.

``DepthAnythingForDepthEstimation`` with a DINOv2 backbone of 4 layers, width 64, 8 px
patches (a 64 px view is 8x8 tokens), the DPT neck and head, ``depth_estimation_type``
``metric`` with ``max_depth`` 20 world units (the farthest floor a view shows is about
17). Its ``DPTImageProcessor`` keeps the 64 px input (ImageNet normalisation, as Depth
Anything). Saved with ``save_pretrained`` (model and processor) in :data:`DEPTH_DIR`, it
loads through the ``pretrained`` depth path (``AutoModelForDepthEstimation`` and
``AutoImageProcessor``, :func:`seg_worker.depth.load_depth`).

Metric, not relative: the toy camera is fixed (:data:`scene_worker.camera.DEFAULT_ORBIT`)
and the solids have known sizes, so one view determines distances; metric depth is what
lets the scene stage place each object in the world from its views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessor,
)

from seg_worker.depth import IMAGENET_MEAN, IMAGENET_STD, build_processor
from toy.scene_weights import DEPTH_DIR

#: The farthest depth the model can predict (world units): the head's sigmoid scale.
MAX_DEPTH = 20
#: Input side (pixels) and patch side: 8x8 tokens.
INPUT_SIZE, PATCH = 64, 8


@dataclass(frozen=True)
class DepthTrainConfig:
    """Recipe of the shipped depth weights (``python -m toy.train_depth`` defaults)."""

    seed: int = 0
    threads: int = 2
    #: Random-layout views (one azimuth each) and canonical scenes (four views each).
    random_views: int = 6000
    canonical_scenes: int = 600
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    hidden: int = 64
    layers: int = 4
    #: Views kept aside (evaluation seeds) for the AbsRel printed at the end.
    eval_views: int = 200
    log_every: int = 50


def depth_config(cfg: DepthTrainConfig | None = None) -> DepthAnythingConfig:
    """The transformers configuration of the toy depth model."""
    cfg = cfg or DepthTrainConfig()
    backbone = Dinov2Config(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=INPUT_SIZE,
        patch_size=PATCH,
        out_indices=list(range(1, cfg.layers + 1))[-4:],
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=PATCH,
        reassemble_hidden_size=cfg.hidden,
        neck_hidden_sizes=[16, 32, 48, 64],
        fusion_hidden_size=32,
        head_hidden_size=16,
        depth_estimation_type="metric",
        max_depth=MAX_DEPTH,
    )


def build_depth_model(cfg: DepthTrainConfig | None = None) -> DepthAnythingForDepthEstimation:
    """A freshly initialised toy depth model (fp32, train mode), seeded by ``cfg.seed``."""
    cfg = cfg or DepthTrainConfig()
    torch.manual_seed(cfg.seed)
    return DepthAnythingForDepthEstimation(depth_config(cfg))


def depth_processor() -> DPTImageProcessor:
    """Depth Anything's preprocessing at the toy's 64 px and 8 px patches (64x64 views
    pass unchanged in size)."""
    return build_processor(INPUT_SIZE, multiple_of=PATCH)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` float 0..255 -> the processor's input (rescale, ImageNet
    normalisation), for training on tensors without a PIL round trip."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images / 255.0 - mean) / std


__all__ = [
    "DEPTH_DIR",
    "INPUT_SIZE",
    "MAX_DEPTH",
    "DepthTrainConfig",
    "build_depth_model",
    "depth_config",
    "depth_processor",
    "normalise",
]
