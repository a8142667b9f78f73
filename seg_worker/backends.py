"""The segmenter backend of a worker, from its settings: ``GENSEG_SEGMENTER`` x profile.

| ``GENSEG_MODELS`` | ``sam`` | ``sam2`` | ``sam3`` |
|---|---|---|---|
| ``tiny`` | tiny ``Sam`` (256 px) | tiny ``Sam2Model`` (256 px) | tiny ``Sam3Model`` (224 px) |
| ``random`` | ``SAM_MODEL`` | the ``SAM2_MODEL`` size | the released SAM 3 |
| ``pretrained`` | ``SAM_MODEL`` + ``SAM_CHECKPOINT`` | ``SAM2_MODEL`` | ``SAM3_MODEL`` |
| ``toy`` and plug-ins | the profile's own | refused | refused |

``tiny`` and ``random`` weights are seeded (``SegConfig.seed``), so every process
builds the same model. ``SAM2_MODEL`` / ``SAM3_MODEL`` are a directory or a hub id
for ``from_pretrained``. Each backend reports what it runs as a ``segmenter`` string
(:class:`Loaded`), put on every mask-ready and asset-ready event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from plumbing.settings import Settings
from seg_worker.backend import BACKENDS, SegBackend, check_backend
from seg_worker.config import SegConfig
from seg_worker.profiles import (
    BUILTIN_PROFILES,
    autocast_dtype,
    compile_image_encoder,
    load_sam,
    resolve_device,
    seg_profile,
)

log = logging.getLogger(__name__)

#: Defaults of the checkpoint settings, when the settings do not have them.
DEFAULT_SAM2_MODEL = "facebook/sam2.1-hiera-large"
DEFAULT_SAM3_MODEL = "facebook/sam3"


@dataclass(frozen=True)
class Loaded:
    """A backend ready to serve, and what it is."""

    backend: SegBackend
    #: ``sam:vit_h:sam_vit_h_4b8939.pth``, ``sam2:facebook/sam2.1-hiera-large``, ...
    segmenter: str
    #: The side of the encoder's input, pixels.
    input_size: int
    #: The model in words for the start-up log (``SAM vit_h``, ``SAM 2.1 large``...).
    model: str


def backend_name(settings: Settings) -> str:
    """``GENSEG_SEGMENTER`` (``sam`` when the settings have no such field); a
    one-line ValueError for an unknown value."""
    return check_backend(str(getattr(settings, "segmenter", BACKENDS[0])))


def check_profile(backend: str, profile: str) -> None:
    """A transformers backend runs the built-in profiles only (ValueError otherwise):
    ``toy`` and plug-in profiles bring a segment-anything model of their own."""
    if backend != "sam" and profile not in BUILTIN_PROFILES:
        seg_profile(profile)  # an unknown profile says so first
        raise ValueError(
            f"the {profile} profile runs segment-anything only: GENSEG_SEGMENTER={backend} "
            f"needs GENSEG_MODELS={', '.join(BUILTIN_PROFILES)} (or GENSEG_SEGMENTER=sam)"
        )


def load_backend(settings: Settings, config: SegConfig) -> Loaded:
    """Build or load the backend ``settings`` ask for, on ``settings.device``."""
    name, profile = backend_name(settings), settings.models
    check_profile(name, profile)
    if name == "sam":
        return _load_sam(settings, config)
    seg_dtype = getattr(settings, "seg_dtype", "auto")
    if seg_dtype not in ("auto", "fp32"):
        # The transformers backends run fp32 for now; a half-precision request they
        # would silently not honour is a configuration error.
        raise ValueError(
            f"GENSEG_SEG_DTYPE={seg_dtype} applies to GENSEG_SEGMENTER=sam only "
            f"({name} runs fp32): unset it or set it to auto or fp32"
        )
    device = resolve_device(settings.device)
    if name == "sam2":
        from seg_worker.hf_sam2 import Sam2Backend, build_sam2, load_sam2

        source = str(getattr(settings, "sam2_model", DEFAULT_SAM2_MODEL))
        if profile == "pretrained":
            model, processor = load_sam2(check_source("SAM2_MODEL", source))
            segmenter = f"sam2:{checkpoint_name(source)}"
        else:
            arch = "tiny" if profile == "tiny" else source
            model, processor = build_sam2(arch, seed=config.seed)
            segmenter = "sam2:tiny" if profile == "tiny" else f"sam2:random:{Path(source).name}"
        backend: SegBackend = Sam2Backend(
            model.to(device), processor, cache_bytes=config.cache_bytes
        )
        side = int(model.config.prompt_encoder_config.image_size)
        return Loaded(backend, segmenter, side, f"SAM 2.1 {segmenter.split(':', 1)[1]}")
    from seg_worker.hf_sam3 import Sam3Backend, build_sam3, load_sam3

    source = str(getattr(settings, "sam3_model", DEFAULT_SAM3_MODEL))
    if profile == "pretrained":
        model3, processor3 = load_sam3(check_source("SAM3_MODEL", source))
        segmenter = f"sam3:{checkpoint_name(source)}"
    else:
        model3, processor3 = build_sam3("tiny" if profile == "tiny" else "full", seed=config.seed)
        segmenter = f"sam3:{profile}"
    backend = Sam3Backend(model3.to(device), processor3, cache_bytes=config.cache_bytes)
    side = int(model3.config.vision_config.backbone_config.image_size)
    return Loaded(backend, segmenter, side, f"SAM 3 {segmenter.split(':', 1)[1]}")


def _load_sam(settings: Settings, config: SegConfig) -> Loaded:
    from seg_worker.predictor import CachedPredictor
    from seg_worker.profiles import profile_arch

    profile = settings.models
    arch = config.arch or settings.sam_model
    model = load_sam(
        profile, arch, checkpoint=settings.sam_checkpoint, device=settings.device, seed=config.seed
    )
    device = resolve_device(settings.device)
    if settings.torch_compile and device.type == "cuda":
        compile_image_encoder(model)
    dtype = autocast_dtype(getattr(settings, "seg_dtype", "auto"), device)
    spec = seg_profile(profile)
    weights = profile
    if spec.weights == "checkpoint":
        weights = checkpoint_name(settings.sam_checkpoint or spec.default_checkpoint or profile)
    arch_name = profile_arch(profile, arch)
    predictor = CachedPredictor(model, cache_bytes=config.cache_bytes, dtype=dtype)
    return Loaded(
        predictor, f"sam:{arch_name}:{weights}", model.image_encoder.img_size, f"SAM {arch_name}"
    )


def check_source(setting: str, source: str) -> str:
    """``source`` for ``from_pretrained``; a path (absolute, ``./``, ``../``, ``~``) that
    is not a directory fails here, in words (transformers would call it a bad hub id)."""
    looks_local = source.startswith(("/", "./", "../", "~")) or Path(source).is_absolute()
    if looks_local and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"{setting} {source!r} is not a directory")
    return str(Path(source).expanduser()) if looks_local else source


def checkpoint_name(source: str) -> str:
    """How the ``segmenter`` field names a checkpoint: a local file or directory by its
    name (a worker's paths mean nothing downstream), a hub id or URL as given."""
    if "://" in source:
        return source.rsplit("/", 1)[-1] or source
    path = Path(source).expanduser()
    return path.name if path.exists() else source
