"""Segment Anything models per profile, and the profiles themselves.

Every profile builds the real segment-anything classes (:class:`Sam`,
:class:`ImageEncoderViT`, :class:`PromptEncoder`, :class:`MaskDecoder`,
:class:`TwoWayTransformer`) from one :class:`SamArch`. A :class:`SegProfile` says
which architecture, where the weights come from, how it tunes the segmenter
(:meth:`seg_worker.config.SegConfig.for_profile`) and which depth model scene views
run (:func:`seg_worker.depth.load_depth`). Built-in (:data:`BUILTIN_PROFILES`):

- ``tiny``: a few-layer configuration with a 256 px encoder input (the classes
  derive every size from ``img_size``: the predictor's resize, the padding, the
  prompt encoder's frame and the mask post-processing, so a smaller input is
  consistent end to end). Random weights, seeded: every process builds the same
  model. Milliseconds per image on a CPU.
- ``random``: ViT-B/L/H (``SAM_MODEL``) at the real 1024 px input with seeded
  random weights: the compute cost of the real model without a download.
- ``pretrained``: the ``SAM_MODEL`` architecture with weights from
  ``SAM_CHECKPOINT`` (a path, or an http(s) URL fetched through torch.hub), read
  with ``torch.load(weights_only=True)`` so a checkpoint cannot run code, or
  with safetensors for a ``.safetensors`` file (tensors only by design).

Other profiles plug in from installed packages: the entry-point group
:data:`ENTRY_POINT_GROUP`, each entry a :class:`SegProfile` named like the profile
(``mine = "my_package.profiles:SEG_PROFILE"``). This worker knows none of them by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
from safetensors.torch import load_file
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from plumbing import plugins

log = logging.getLogger(__name__)

#: The entry-point group of segmenter profile plug-ins.
ENTRY_POINT_GROUP = "genseg.seg_profiles"

#: Seed of the random initialisation; the same in every process.
DEFAULT_SEED = 0

#: SAM's input normalisation (ImageNet's, in 0-255 units): buffers of ``Sam`` that no
#: checkpoint holds.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

#: ``GENSEG_SEG_DTYPE`` values other than ``auto`` -> autocast dtype (None: fp32).
SEG_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class SamArch:
    """Hyper-parameters of one SAM architecture (sizes in pixels or channels)."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    img_size: int = 1024  # long side of the encoder input, pixels
    patch_size: int = 16
    window_size: int = 14  # windowed-attention size, in patches
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the real models)."""
        return self.img_size // self.patch_size


#: The official architectures (segment_anything.build_sam) plus ``tiny``. ``SAM_MODEL``
#: names one of the official ones; a plug-in profile brings its own :class:`SamArch`.
ARCHS: dict[str, SamArch] = {
    "vit_h": SamArch("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArch("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArch("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    # 256 px input -> 16x16 embedding, 64x64 low-res masks. Two encoder blocks
    # (one windowed, one global) and the real two-layer two-way transformer.
    "tiny": SamArch(
        "tiny",
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        img_size=256,
        window_size=8,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
    ),
}


def build_sam(arch: str | SamArch, *, seed: int = DEFAULT_SEED) -> Sam:
    """A SAM model of ``arch`` with seeded random weights, in eval mode, on the CPU.

    The global RNG is left untouched (``fork_rng``), so building a model does not
    change the random stream of the caller.
    """
    spec = ARCHS[arch] if isinstance(arch, str) else arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _inference(_construct(spec))


def sam_with_weights(arch: str | SamArch, state: Mapping[str, torch.Tensor]) -> Sam:
    """A SAM model of ``arch`` holding the tensors of ``state``, in eval mode, on their
    device (the CPU for :func:`read_checkpoint`'s).

    The model is built on the meta device and takes the state's tensors as they are
    (cast to the model's dtypes where they differ): ViT-H's 636M parameters are neither
    initialised, about 10 s on a 2-core CPU, nor copied. Strict: a ``state`` of another
    architecture raises ValueError with the mismatching keys.
    """
    spec = ARCHS[arch] if isinstance(arch, str) else arch
    with torch.device("meta"):
        model = _construct(spec)
    expected = model.state_dict()
    fitted = {
        key: tensor.to(expected[key].dtype) if key in expected else tensor
        for key, tensor in state.items()
    }
    try:
        model.load_state_dict(fitted, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"does not fit architecture {spec.name!r}: {exc}") from None
    # The two buffers no checkpoint holds (persistent=False in Sam).
    model.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    model.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise RuntimeError(f"SAM {spec.name}: no tensor for {empty} after loading")
    return _inference(model)


def _construct(spec: SamArch) -> Sam:
    """SAM's modules for ``spec``, initialised as their constructors do."""
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(spec.embedding_size, spec.embedding_size),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=spec.iou_head_depth,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


def _inference(model: Sam) -> Sam:
    model.eval()
    model.requires_grad_(False)
    return model


def read_checkpoint(checkpoint: str) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint`` (a path or an http(s) URL), tensors only.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything
    else with ``torch.load(weights_only=True)``, which refuses pickled code. URLs go
    through torch.hub's cache (``TORCH_HOME``), so a worker downloads a checkpoint
    once per machine.
    """
    if urlsplit(checkpoint).scheme in ("http", "https"):
        state = torch.hub.load_state_dict_from_url(
            checkpoint, map_location="cpu", weights_only=True, progress=False
        )
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint {checkpoint!r} is not a file")
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {checkpoint!r} does not hold a state dict")
    return state


# --- profiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegProfile:
    """A segmenter model profile: the SAM it runs, its segmenter tuning, its depth model."""

    name: str
    #: The profile's own architecture; None: the configured one (``SegConfig.arch`` or
    #: ``SAM_MODEL``, an entry of :data:`ARCHS`).
    arch: SamArch | None = None
    #: ``random``: seeded initialisation; ``checkpoint``: ``SAM_CHECKPOINT``, else
    #: :attr:`default_checkpoint`, loaded strictly.
    weights: Literal["random", "checkpoint"] = "random"
    default_checkpoint: str | None = None
    #: :class:`~seg_worker.config.SegConfig` fields this profile sets (field -> value).
    config: Mapping[str, Any] = field(default_factory=dict)
    #: Depth model of scene views: a :data:`seg_worker.depth.ARCHS` name, built with
    #: seeded random weights; None: a pretrained model, ``DEPTH_MODEL`` when it is set,
    #: else :attr:`default_depth_model`, else ``DEPTH_MODEL``'s default.
    depth_arch: str | None = None
    #: The profile's own trained depth model (a ``save_pretrained`` directory).
    default_depth_model: str | None = None


BUILTIN_PROFILES: dict[str, SegProfile] = {
    p.name: p
    for p in (
        # A 4x4 automatic grid (speed), and no stability filter: with random weights the
        # stability score says nothing, so only ``min_confidence`` filters.
        SegProfile(
            "tiny",
            arch=ARCHS["tiny"],
            config={"auto_points_per_side": 4, "auto_stability_thresh": 0.0},
            depth_arch="tiny",
        ),
        SegProfile("random", depth_arch="small"),
        SegProfile("pretrained", weights="checkpoint"),
    )
}


def plugin_names() -> list[str]:
    """Names of the profiles installed packages declare (none is imported)."""
    return plugins.plugin_names(ENTRY_POINT_GROUP)


def known_profiles() -> list[str]:
    """The built-in profiles, then those installed packages declare."""
    return [*BUILTIN_PROFILES, *(n for n in plugin_names() if n not in BUILTIN_PROFILES)]


def seg_profile(name: str) -> SegProfile:
    """The profile ``name``: a built-in one (a plug-in cannot replace it), else an
    installed plug-in, whose module is imported now.

    Entry points are read on every call, not cached: a worker resolves its profile a
    few times at start-up (milliseconds each), and no module-level state can go stale.
    Raises ValueError naming every known profile when there is none of that name.
    """
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name]
    profile = plugins.load_plugin(ENTRY_POINT_GROUP, name, SegProfile, "segmenter profile")
    if profile is None:
        raise ValueError(
            f"unknown model profile {name!r}: expected one of {', '.join(known_profiles())}"
        )
    return profile


def resolve_arch(profile: str, arch: str | SamArch) -> SamArch:
    """The architecture ``profile`` runs: its own, else ``arch`` (``SegConfig.arch`` or
    ``SAM_MODEL``: an entry of :data:`ARCHS`, or a :class:`SamArch`)."""
    own = seg_profile(profile).arch
    if own is not None:
        return own
    if isinstance(arch, SamArch):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"unknown SAM architecture {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch]


def profile_arch(profile: str, arch: str | SamArch) -> str:
    """The name of the architecture ``profile`` runs (see :func:`resolve_arch`)."""
    return resolve_arch(profile, arch).name


def load_sam(
    profile: str,
    arch: str | SamArch,
    *,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = DEFAULT_SEED,
) -> Sam:
    """Build the model of ``profile`` on ``device``.

    ``arch``: see :func:`resolve_arch` (a profile with its own architecture ignores it).
    A profile with ``weights="checkpoint"`` loads ``checkpoint`` (else its default)
    strictly: a checkpoint of another architecture fails here with the mismatching
    keys, not later with odd masks.
    """
    spec = seg_profile(profile)
    sam_arch = resolve_arch(profile, arch)
    if spec.weights != "checkpoint":
        return build_sam(sam_arch, seed=seed).to(resolve_device(device))
    checkpoint = checkpoint or spec.default_checkpoint
    if not checkpoint:
        raise ValueError(f"the {profile} profile needs SAM_CHECKPOINT (a path or URL)")
    state = read_checkpoint(checkpoint)  # before building: a missing file is said first
    try:
        model = sam_with_weights(sam_arch, state)
    except ValueError as exc:
        raise ValueError(f"SAM checkpoint {checkpoint!r} {exc}") from None
    log.info("loaded SAM %s weights from %s", sam_arch.name, checkpoint)
    return model.to(resolve_device(device))


def compile_image_encoder(
    model: Sam, backend: str | Callable[..., Any] = "inductor", fullgraph: bool = False
) -> None:
    """``torch.compile`` SAM's image encoder in place (``GENSEG_TORCH_COMPILE`` on CUDA).

    Its input is always the padded ``[B, 3, 1024, 1024]`` batch, so it compiles once per
    batch size, on the first batch of that size; the prompt encoder and mask decoder
    (milliseconds a prompt) stay eager. ``backend``: tests use one that skips code
    generation.
    """
    model.image_encoder = torch.compile(model.image_encoder, backend=backend, fullgraph=fullgraph)


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype SAM's passes autocast to under ``GENSEG_SEG_DTYPE`` = ``setting`` on
    ``device``; None: plain fp32. ``auto``: bf16 on CUDA (fp16 on a GPU without bf16),
    fp32 on the CPU, where half precision is slower and only tests ask for it."""
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting not in SEG_DTYPES:
        raise ValueError(f"GENSEG_SEG_DTYPE={setting!r}: expected auto, {', '.join(SEG_DTYPES)}")
    return SEG_DTYPES[setting]


def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
