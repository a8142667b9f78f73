"""Configurations of the transformers segmenters (SAM 2.1, SAM 3), built in code.

No download: the ``tiny`` profile's configurations are small versions of the real
architectures (a 256 px Hiera with four one- or two-block stages for SAM 2.1; a
224 px two-layer ViT, a two-layer CLIP text encoder and one-layer DETR encoder
and decoder for SAM 3), and the ``random`` profile's are the published sizes
(the ``sam2.1_hiera_*.yaml`` files of facebookresearch/sam2; transformers'
``Sam3Config`` defaults are facebook/sam3's). The tiny SAM 3 reads text through
a byte-level CLIP tokenizer written here (every byte a token, no merges), since
the real one is a download.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer, Sam2Config, Sam3Config

#: Side of the tiny SAM 2.1 input, pixels (a 16x16 embedding, 64x64 low-res masks).
TINY_SAM2_SIZE = 256
#: Side of the tiny SAM 3 input, pixels (16x16 patches of 14 px).
TINY_SAM3_SIZE = 224
#: Text length SAM 3's processor pads to (its CLIP has 32 positions).
SAM3_TEXT_LENGTH = 32
#: The real SAM 3 CLIP vocabulary; the random profile's tokenizer pads to it.
SAM3_VOCAB_SIZE = 49408


@dataclass(frozen=True)
class HieraArch:
    """A SAM 2.1 Hiera image encoder (the trunk of ``sam2.1_hiera_*.yaml``)."""

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, int, int, int]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg: tuple[int, int] = (7, 7)
    window_spec: tuple[int, int, int, int] = (8, 4, 14, 7)
    image_size: int = 1024


#: The released SAM 2.1 sizes (facebook/sam2.1-hiera-{tiny,small,base-plus,large}).
SAM2_ARCHS: dict[str, HieraArch] = {
    a.name: a
    for a in (
        HieraArch("tiny", 96, 1, (1, 2, 7, 2), (5, 7, 9)),
        HieraArch("small", 96, 1, (1, 2, 11, 2), (7, 10, 13)),
        HieraArch("base-plus", 112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
        HieraArch("large", 144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
    )
}


def sam2_arch_of(model_id: str) -> HieraArch:
    """The released size a SAM 2.1 id or directory name says (``...hiera-large``,
    ``sam2.1_hiera_tiny``...); ValueError when it names none."""
    name = Path(model_id).name.lower().replace("_", "-").replace("b+", "base-plus")
    for size in sorted(SAM2_ARCHS, key=len, reverse=True):  # "base-plus" before "small"...
        if name.endswith(size) or f"-{size}-" in name or f"hiera-{size}" in name:
            return SAM2_ARCHS[size]
    raise ValueError(
        f"SAM2_MODEL {model_id!r} names no SAM 2.1 size: expected one ending in "
        f"{', '.join(SAM2_ARCHS)} (e.g. facebook/sam2.1-hiera-large)"
    )


def sam2_config(arch: HieraArch) -> Sam2Config:
    """The full-size SAM 2.1 configuration of ``arch`` (256-wide prompt decoder)."""
    dims = [arch.embed_dim * 2**i for i in range(4)]
    side = arch.image_size
    return Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": arch.embed_dim,
                "num_attention_heads": arch.num_heads,
                "image_size": [side, side],
                "blocks_per_stage": list(arch.stages),
                "embed_dim_per_stage": dims,
                "num_attention_heads_per_stage": [arch.num_heads * 2**i for i in range(4)],
                "window_size_per_stage": list(arch.window_spec),
                "global_attention_blocks": list(arch.global_att_blocks),
                "window_positional_embedding_background_size": list(arch.window_pos_embed_bkg),
            },
            "backbone_channel_list": dims[::-1],
            "backbone_feature_sizes": [[side // s, side // s] for s in (4, 8, 16)],
        },
        prompt_encoder_config={"image_size": side},
    )


def tiny_sam2_config() -> Sam2Config:
    """SAM 2.1 at 256 px: Hiera of width 16 with stages of 1, 1, 2, 1 blocks (global
    attention in the second block of stage 3, as the real ones put it mid-stage), a
    32-wide prompt encoder and two-way transformer. About 0.35 M parameters."""
    side = TINY_SAM2_SIZE
    return Sam2Config(
        vision_config={
            "model_type": "sam2_vision_model",
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 16,
                "num_attention_heads": 1,
                "image_size": [side, side],
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [16, 32, 64, 128],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "window_size_per_stage": [8, 4, 4, 4],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[side // s, side // s] for s in (4, 8, 16)],
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": side,
            "patch_size": 16,
            "mask_input_channels": 8,
        },
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )


#: SAM 3's text encoder (``Sam3Config``'s default, spelled out: a text config given as a
#: dict replaces the default rather than updating it).
SAM3_TEXT: dict[str, Any] = {
    "model_type": "clip_text_model",
    "vocab_size": SAM3_VOCAB_SIZE,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": SAM3_TEXT_LENGTH,
    "hidden_act": "gelu",
}


def sam3_config(tokenizer: CLIPTokenizer | None = None) -> Sam3Config:
    """The full SAM 3 detector (a 32-layer ViT of width 1024 at 1008 px, the 24-layer
    CLIP text encoder, 6-layer DETR encoder and decoder with 200 queries):
    transformers' defaults. ``tokenizer`` sets the special token ids of the text
    encoder."""
    return Sam3Config(text_config=_text_ids(tokenizer, SAM3_TEXT))


def tiny_sam3_config(tokenizer: CLIPTokenizer) -> Sam3Config:
    """SAM 3 at 224 px: a two-layer ViT of width 32 (window 8, the second layer
    global), a 32-wide FPN, a two-layer CLIP text encoder over ``tokenizer``'s
    vocabulary, one-layer geometry, DETR encoder and decoder (16 queries). About
    0.3 M parameters."""
    width = 32
    text: dict[str, Any] = {
        "model_type": "clip_text_model",
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "projection_dim": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": SAM3_TEXT_LENGTH,
    }
    side = TINY_SAM3_SIZE
    layer = {"hidden_size": width, "num_attention_heads": 2, "intermediate_size": 2 * width}
    return Sam3Config(
        vision_config={
            "model_type": "sam3_vision_model",
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": side,
                "patch_size": 14,
                "window_size": 8,
                "global_attn_indexes": [1],
                "pretrain_image_size": 112,
            },
            "fpn_hidden_size": width,
            "backbone_feature_sizes": [[side // 14 * f, side // 14 * f] for f in (4, 2, 1)],
        },
        text_config=_text_ids(tokenizer, text),
        geometry_encoder_config={**layer, "num_layers": 1},
        detr_encoder_config={**layer, "num_layers": 1},
        detr_decoder_config={**layer, "num_layers": 1, "num_queries": 16},
        mask_decoder_config={"hidden_size": width, "num_attention_heads": 2},
    )


def _text_ids(tokenizer: CLIPTokenizer | None, text: dict[str, Any]) -> dict[str, Any]:
    if tokenizer is None:
        return text
    return {
        **text,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def byte_clip_tokenizer(vocab_size: int | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are single bytes (alone and as a word end), plus
    the start and end tokens; padded with unused tokens to ``vocab_size`` when given.
    Text is padded to :data:`SAM3_TEXT_LENGTH` tokens, as SAM 3's processor does."""
    symbols = [chr(c) for c in _byte_symbols()]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    if vocab_size is not None:
        tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    with tempfile.TemporaryDirectory(prefix="genseg-sam3-tokenizer-") as tmp:
        (Path(tmp) / "vocab.json").write_text(
            json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8"
        )
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", "utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=SAM3_TEXT_LENGTH)


def _byte_symbols() -> list[int]:
    """Code points of CLIP's reversible byte -> printable character table, in byte order
    of GPT-2's ``bytes_to_unicode`` (printable bytes first, then the rest from 256)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in printable]
    return printable + [256 + i for i in range(len(rest))]
