"""What the toy generator is: its vocabulary and tokenizer, its networks, its noise
schedule, and the recipe that trains them (:class:`TrainConfig`, see :mod:`toy.train_gen`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gen_worker.architectures import SD15_SCHEDULER_CONFIG
from gen_worker.tokenizer import local_clip_tokenizer
from toy.world import PALETTE, SHAPES

#: Words of the toy captions: each one token.
TOY_WORDS: tuple[str, ...] = ("a", "an", "and", "next", "to", *PALETTE, *SHAPES)
#: Token budget of a caption (BOS + words + EOS); the longest world caption needs 13.
MAX_TOKENS = 20
#: Noise schedule: SD 1.5's, predicting v.
TOY_SCHEDULER_CONFIG: dict[str, Any] = {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}


@dataclass(frozen=True)
class TrainConfig:
    """Recipe of the shipped weights (``python -m toy.train_gen`` defaults)."""

    scenes: int = 20_000
    seed: int = 0
    threads: int = 2
    #: ``cpu`` (the shipped weights; deterministic) or ``cuda`` (recipe exploration).
    device: str = "cpu"
    #: A file to keep the built world in (torch.save): later runs load it instead.
    world_cache: str = ""
    #: ``bf16`` (autocast, the recipe: about 1.5x faster training steps on this CPU) or
    #: ``fp32``. Weights, optimiser and losses stay fp32 either way.
    precision: str = "bf16"
    vae_channels: str = "16,32,32"
    latent_channels: int = 4
    unet_channels: str = "64,128,128"
    # VAE
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    #: Extra reconstruction weight of shape-edge pixels (see ``train_gen.edge_weights``):
    #: without it the VAE's round trip turned most stars into circles.
    vae_edge_weight: float = 4.0
    # text encoder + UNet
    unet_steps: int = 3000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    cfg_dropout: float = 0.1
    #: 0: the plain v-loss. Min-SNR-5 (the recipe until 2026-11-30) weighted the steps
    #: above t = 600, where a shape is decided, at 0.16 and less (docs/toy.md).
    min_snr_gamma: float = 0.0
    attn_weight: float = 0.5
    #: Extra diffusion-loss weight of the latent cells an object covers, and of those on
    #: an object's edge (partly covered); see ``gen_losses.cell_weights``. Options tried
    #: while looking for what makes shapes (off: they did not help, docs/toy.md).
    object_cell_weight: float = 0.0
    edge_cell_weight: float = 0.0
    #: Also condition every UNet block on the whole caption (diffusers'
    #: ``addition_embed_type="text"``: the caption attention-pooled into the time embedding).
    text_time_embedding: bool = False
    #: Train the text encoder with the UNet (True), or keep it as initialised, like SD's
    #: frozen CLIP. (Without the shape contrast, the trained encoder's state of a shape
    #: word became its colour's, cosine 0.999; freezing kept them apart but did not by
    #: itself make the UNet draw shapes: docs/toy.md.)
    train_text_encoder: bool = True
    #: Weight of a hinge that asks the denoiser to do at least ``shape_contrast_margin``
    #: (relative) worse when every shape word of the caption is swapped for another: a
    #: training signal that depends on the shape words alone (``gen_losses.shape_contrast``).
    shape_contrast_weight: float = 1.0
    shape_contrast_margin: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 50


def toy_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with one token per toy word, ``MAX_TOKENS`` long."""
    return local_clip_tokenizer(max_length=MAX_TOKENS, words=TOY_WORDS, whole_words=True)


def parse_channels(text: str) -> tuple[int, ...]:
    """``"32,64,64"`` -> ``(32, 64, 64)`` (channel lists are text in the recipes)."""
    return tuple(int(c) for c in text.split(","))


def build_models(
    tokenizer: CLIPTokenizer, cfg: TrainConfig
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """Freshly initialised VAE, text encoder and UNet of the flat recipe (fp32), seeded."""
    return build_toy_sd(
        tokenizer,
        seed=cfg.seed,
        vae_channels=parse_channels(cfg.vae_channels),
        unet_channels=parse_channels(cfg.unet_channels),
        latent_channels=cfg.latent_channels,
        max_tokens=MAX_TOKENS,
        text_time_embedding=cfg.text_time_embedding,
    )


def build_toy_sd(
    tokenizer: CLIPTokenizer,
    *,
    seed: int,
    vae_channels: tuple[int, ...],
    unet_channels: tuple[int, ...],
    latent_channels: int,
    max_tokens: int,
    text_time_embedding: bool = False,
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """The toy Stable Diffusion classes, freshly initialised (fp32) after
    ``torch.manual_seed(seed)``: a VAE (64x64x3 <-> 16x16 x ``latent_channels``), a small
    CLIP text encoder of ``max_tokens`` positions, a UNet with cross-attention at 16 and
    8 cells. The flat and the scene generator differ only in these arguments."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1,
        norm_num_groups=min(16, vae_channels[0]),
        sample_size=64,
        mid_block_add_attention=False,  # flat shapes need no global context; costs time
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_tokens,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=min(32, unet_channels[0]),
        **(
            {"addition_embed_type": "text", "addition_embed_type_num_heads": 4}
            if text_time_embedding
            else {}
        ),
    )
    return vae, text_encoder, unet
