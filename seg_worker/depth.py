"""Monocular depth for scene views: model profiles, estimation, the 16-bit depth PNG.

Models are the transformers depth-estimation classes (``DepthAnythingForDepthEstimation``,
``DPTForDepthEstimation``) with a ``DPTImageProcessor`` in front. The model profile's
``SegProfile.depth_arch`` chooses (a plug-in profile names one of :data:`ARCHS`, or None
for ``DEPTH_MODEL``); the built-in profiles:

- ``tiny``: a Depth Anything with a 4-layer DINOv2 backbone of width 32 and a 112 px
  input, built in code with seeded random weights (~0.1 M parameters, milliseconds on
  a CPU). Its depth is arbitrary, like the tiny SAM's masks.
- ``random``: the Depth-Anything-V2-Small architecture (DINOv2-S, 518 px) with seeded
  random weights: the real compute cost without a download.
- ``pretrained``: ``from_pretrained(DEPTH_MODEL)``, a Hugging Face id or a local
  directory (model and, when present, its preprocessor config). A plug-in profile may
  ship its own trained model (``SegProfile.default_depth_model``, e.g. ``toy``'s metric
  model of the 3D toy world), loaded the same way unless ``DEPTH_MODEL`` is set.

Units. Relative models (Depth Anything's default, DPT/MiDaS) predict *relative inverse
depth* (disparity: larger is nearer) up to an unknown scale and shift. genseg reports
``1 - minmax(disparity)``: **relative depth in 0..1 per image, 0 = nearest, 1 =
farthest**, linear in the model's disparity, not comparable across images. Metric models
(``config.depth_estimation_type == "metric"``) predict metres, reported as is.

Depth PNG: 16-bit grayscale (mode ``I;16``) at the image's size, value
``round(clip(depth / scale, 0, 1) * 65535)`` with ``scale`` 1 for relative depth and
``config.max_depth`` metres for metric depth; larger is farther in both. The PNG's text
chunks ``genseg:depth_units`` (``relative`` | ``metres``) and ``genseg:depth_scale``
say which.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from transformers import (
    AutoImageProcessor,
    AutoModelForDepthEstimation,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessor,
    PreTrainedModel,
)

from plumbing.images import decode_image
from plumbing.settings import Settings
from seg_worker.profiles import resolve_device, seg_profile

log = logging.getLogger(__name__)

DepthUnits = Literal["relative", "metres"]
DEPTH_MEDIA_TYPE = "image/png"
#: Text chunks of the depth PNG that say how to read its values.
UNITS_KEY = "genseg:depth_units"
SCALE_KEY = "genseg:depth_scale"
#: Depth Anything's normalisation (ImageNet mean and std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 14


@dataclass(frozen=True)
class DepthArch:
    """A Depth Anything architecture: DINOv2 backbone + DPT neck and head."""

    name: str
    hidden_size: int
    layers: int
    heads: int
    out_indices: tuple[int, ...]
    neck_hidden_sizes: tuple[int, int, int, int]
    fusion_hidden_size: int
    head_hidden_size: int
    input_size: int  # processor target side, pixels (a multiple of the 14 px patch)
    mlp_ratio: int = 4


ARCHS: dict[str, DepthArch] = {
    # Depth-Anything-V2-Small-hf's configuration (DINOv2-S, ~25 M parameters).
    "small": DepthArch("small", 384, 12, 6, (3, 6, 9, 12), (48, 96, 192, 384), 64, 32, 518),
    # 8x8 patches at 112 px; every stage of the real classes, just narrow.
    "tiny": DepthArch("tiny", 32, 4, 2, (1, 2, 3, 4), (8, 16, 32, 32), 16, 8, 112, mlp_ratio=2),
}


def depth_config(arch: str | DepthArch) -> DepthAnythingConfig:
    """The transformers configuration of ``arch`` (relative depth)."""
    spec = ARCHS[arch] if isinstance(arch, str) else arch
    backbone = Dinov2Config(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        image_size=spec.input_size,
        patch_size=PATCH,
        out_indices=list(spec.out_indices),
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=PATCH,
        reassemble_hidden_size=spec.hidden_size,
        neck_hidden_sizes=list(spec.neck_hidden_sizes),
        fusion_hidden_size=spec.fusion_hidden_size,
        head_hidden_size=spec.head_hidden_size,
        depth_estimation_type="relative",
    )


def build_depth_model(arch: str | DepthArch, *, seed: int = 0) -> DepthAnythingForDepthEstimation:
    """A Depth Anything model of ``arch`` with seeded random weights, eval mode, on the CPU.

    The caller's RNG is untouched (``fork_rng``), so every process builds the same model.
    """
    config = depth_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
    model.eval()
    model.requires_grad_(False)
    return model


def build_processor(input_size: int, *, multiple_of: int = PATCH) -> DPTImageProcessor:
    """Depth Anything's preprocessing: keep the aspect ratio, sides multiples of
    ``multiple_of`` (the backbone's patch, 14) near ``input_size``, bicubic, ImageNet
    normalisation."""
    return DPTImageProcessor(
        do_resize=True,
        size={"height": input_size, "width": input_size},
        keep_aspect_ratio=True,
        ensure_multiple_of=multiple_of,
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_pad=False,
    )


@dataclass(frozen=True)
class DepthMap:
    """Depth of one image: ``values`` ``[H, W]`` float32 at the image's size.

    ``units`` ``relative``: 0 = nearest, 1 = farthest in this image; ``metres``: metric.
    ``scale``: the value stored as 65535 in the PNG (1 for relative depth).
    """

    values: np.ndarray
    units: DepthUnits
    scale: float

    def normalised(self) -> np.ndarray:
        """``values / scale`` clipped to 0..1 (what the PNG stores, before quantising)."""
        return np.clip(self.values / self.scale, 0.0, 1.0).astype(np.float32)


class DepthEstimator:
    """A depth model with its processor; :meth:`estimate` maps an image to a :class:`DepthMap`."""

    def __init__(self, model: PreTrainedModel, processor: DPTImageProcessor) -> None:
        self.model = model
        self.processor = processor
        kind = getattr(model.config, "depth_estimation_type", "relative")
        self.units: DepthUnits = "metres" if kind == "metric" else "relative"
        max_depth = getattr(model.config, "max_depth", None)
        self.scale = float(max_depth) if self.units == "metres" and max_depth else 1.0
        self._lock = threading.Lock()  # one forward at a time: the model is shared

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def estimate(self, image: np.ndarray) -> DepthMap:
        """Depth of ``image`` ``[H, W, 3]`` uint8 RGB, resized back to ``H x W``."""
        height, width = image.shape[:2]
        # a writable copy: the processor hands the array to torch.from_numpy
        inputs = self.processor(images=np.array(image), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        with self._lock, torch.inference_mode():
            predicted = self.model(pixel_values=pixels).predicted_depth  # [1, h, w]
            full = torch.nn.functional.interpolate(
                predicted[:, None].float(), size=(height, width), mode="bilinear"
            )[0, 0]
        raw = full.cpu().numpy().astype(np.float64)
        if self.units == "metres":
            values = np.clip(raw, 0.0, None)
        else:
            lo, hi = float(raw.min()), float(raw.max())
            # disparity: larger is nearer, so nearest -> 0 and farthest -> 1
            values = 1.0 - (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)
        return DepthMap(values.astype(np.float32), self.units, self.scale)


def depth_model_of(settings: Settings) -> str:
    """The pretrained depth model the worker loads: ``DEPTH_MODEL`` when it is set, else
    the profile's own (``SegProfile.default_depth_model``), else ``DEPTH_MODEL``'s
    default."""
    explicit = "depth_model" in settings.model_fields_set and settings.depth_model
    default = seg_profile(settings.models).default_depth_model
    return settings.depth_model if explicit or default is None else default


def load_depth(
    profile: str, model_id: str, *, device: str = "cpu", seed: int = 0
) -> DepthEstimator:
    """The depth estimator of ``profile`` on ``device``.

    A profile with a ``depth_arch`` builds that architecture with seeded random weights
    (``tiny``: the tiny one, ``random``: Depth-Anything-V2-Small's). Otherwise
    (``pretrained``) ``model_id`` is loaded (a Hugging Face id or a local directory) with
    ``AutoModelForDepthEstimation`` and its ``AutoImageProcessor``; a directory without a
    preprocessor config gets Depth Anything's 518 px preprocessing.
    """
    depth_arch = seg_profile(profile).depth_arch
    if depth_arch is not None:
        arch = ARCHS[depth_arch]
        model: PreTrainedModel = build_depth_model(arch, seed=seed)
        processor = build_processor(arch.input_size)
    else:
        model = AutoModelForDepthEstimation.from_pretrained(model_id)
        model.eval()
        model.requires_grad_(False)
        try:
            processor = AutoImageProcessor.from_pretrained(model_id)
        except OSError:
            log.warning("%s has no preprocessor config: using Depth Anything's", model_id)
            processor = build_processor(ARCHS["small"].input_size)
        log.info("loaded depth model %s (%s)", model_id, type(model).__name__)
    return DepthEstimator(model.to(resolve_device(device)), processor)


def encode_depth_png(depth: DepthMap) -> bytes:
    """The 16-bit depth PNG of ``depth`` (see the module docstring for the format)."""
    pixels = np.round(depth.normalised() * 65535).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add_text(UNITS_KEY, depth.units)
    info.add_text(SCALE_KEY, repr(depth.scale))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def decode_depth_png(data: bytes, *, max_pixels: int = 4096 * 4096) -> DepthMap:
    """A :class:`DepthMap` from :func:`encode_depth_png`'s bytes (quantised to 1/65535)."""
    image = decode_image(data, max_pixels=max_pixels, mode=None)
    units = image.info.get(UNITS_KEY, "relative")
    scale = float(image.info.get(SCALE_KEY, 1.0))
    pixels = np.asarray(image, dtype=np.float64) / 65535.0
    return DepthMap((pixels * scale).astype(np.float32), units, scale)


def median_depth(depth: DepthMap, mask: np.ndarray) -> float | None:
    """Median depth inside ``mask`` ``[H, W]`` bool, in ``depth.units``; None when empty."""
    inside = depth.values[mask]
    return round(float(np.median(inside)), 6) if inside.size else None
