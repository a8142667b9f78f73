"""Segment Anything models per profile: ``tiny``, ``toy``, ``random`` and ``pretrained``.

Every profile builds the real segment-anything classes (:class:`Sam`,
:class:`ImageEncoderViT`, :class:`PromptEncoder`, :class:`MaskDecoder`,
:class:`TwoWayTransformer`) from one :class:`SamArch`:

- ``tiny``: a few-layer configuration with a 256 px encoder input (the classes
  derive every size from ``img_size``: the predictor's resize, the padding, the
  prompt encoder's frame and the mask post-processing, so a smaller input is
  consistent end to end). Random weights, seeded: every process builds the same
  model. Milliseconds per image on a CPU.
- ``toy``: the ``toy`` architecture (64 px input) with the weights trained on the
  toy world (``toy/train_sam.py``), shipped as ``toy/weights/sam.safetensors`` and
  loaded exactly like ``pretrained`` (:func:`read_checkpoint`, strict
  ``load_state_dict``); ``SAM_CHECKPOINT`` overrides the file.
- ``random``: ViT-B/L/H (``SAM_MODEL``) at the real 1024 px input with seeded
  random weights: the compute cost of the real model without a download.
- ``pretrained``: the ``SAM_MODEL`` architecture with weights from
  ``SAM_CHECKPOINT`` (a path, or an http(s) URL fetched through torch.hub), read
  with ``torch.load(weights_only=True)`` so a checkpoint cannot run code, or
  with safetensors for a ``.safetensors`` file (tensors only by design).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal
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

log = logging.getLogger(__name__)

Profile = Literal["tiny", "toy", "random", "pretrained"]

#: Seed of the random initialisation; the same in every process.
DEFAULT_SEED = 0


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


#: The official architectures (segment_anything.build_sam) plus ``tiny``.
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
    # Trained on the toy world (toy/train_sam.py, weights in toy/weights/): 64 px input,
    # patch 4 -> 16x16 embedding and 64x64 low-res masks (full resolution for the toy
    # world's 64x64 images). Four encoder blocks of width 64 (windows of 8x8 patches,
    # global attention in blocks 2 and 4) and the real two-layer two-way transformer.
    "toy": SamArch(
        "toy",
        encoder_embed_dim=64,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        img_size=64,
        patch_size=4,
        window_size=8,
        prompt_embed_dim=64,
        mask_in_chans=16,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
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
        model = Sam(
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
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return _inference(model)


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


def load_sam(
    profile: Profile,
    arch: str,
    *,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = DEFAULT_SEED,
) -> Sam:
    """Build the model of ``profile`` on ``device``.

    ``arch`` names an entry of :data:`ARCHS`; the ``tiny`` and ``toy`` profiles always
    use their own architecture (:func:`profile_arch`). ``pretrained`` loads
    ``checkpoint`` strictly: a checkpoint of another architecture fails here with the
    mismatching keys, not later with odd masks. ``toy`` is ``pretrained`` with the
    shipped toy weights (``toy.weights.SAM_WEIGHTS``) unless ``checkpoint`` is given.
    """
    arch = profile_arch(profile, arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown SAM architecture {arch!r}; expected one of {sorted(ARCHS)}")
    model = build_sam(arch, seed=seed)
    if profile == "toy" and not checkpoint:
        from toy.weights import SAM_WEIGHTS

        checkpoint = str(SAM_WEIGHTS)
    if profile in ("pretrained", "toy"):
        if not checkpoint:
            raise ValueError("the pretrained profile needs SAM_CHECKPOINT (a path or URL)")
        state = read_checkpoint(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"SAM checkpoint {checkpoint!r} does not fit architecture {arch!r}: {exc}"
            ) from None
        log.info("loaded SAM %s weights from %s", arch, checkpoint)
    elif profile not in ("tiny", "random"):
        raise ValueError(f"unknown model profile {profile!r}")
    return _inference(model).to(resolve_device(device))


def profile_arch(profile: str, arch: str) -> str:
    """The architecture a profile runs: ``tiny`` and ``toy`` have their own, the others
    take ``arch`` (``SegConfig.arch`` or ``SAM_MODEL``)."""
    return profile if profile in ("tiny", "toy") else arch


def resolve_device(device: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
