"""What the toy scene generator is: its vocabulary and tokenizer, its networks and the
recipe that trains them (:class:`SceneTrainConfig`, see :mod:`toy.train_scene`).

The same Stable Diffusion classes as the flat toy generator (:mod:`toy.gen_model`),
trained on the 3D world's canonical views (:mod:`toy.world3d`): captions that name the
solids *and the view* ("a red cube and a blue sphere, view from 45 degrees"), so its
vocabulary holds the view words and its prompts are long enough to keep them (the flat
generator's 20 tokens cut the view off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gen_worker.architectures import SD15_SCHEDULER_CONFIG
from gen_worker.tokenizer import local_clip_tokenizer
from toy.scene_weights import SCENE_SD_DIR
from toy.world import PALETTE
from toy.world3d import SOLIDS

#: Words of the scene captions, each one token. Digits are one token each (CLIP splits
#: numbers into digits), so "135" is three.
SCENE_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "and",
    "next",
    "to",
    "view",
    "from",
    "degrees",
    *PALETTE,
    *SOLIDS,
)
#: Token budget of a prompt (BOS + words + EOS); the longest scene caption needs 20.
SCENE_MAX_TOKENS = 24
#: Noise schedule: SD 1.5's, predicting v (as the flat toy generator).
SCENE_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "prediction_type": "v_prediction",
}


@dataclass(frozen=True)
class SceneTrainConfig:
    """Recipe of the shipped scene generator (``python -m toy.train_scene`` defaults)."""

    #: Canonical scenes rendered for training (four views each; held-out combinations
    #: of solids are skipped, see :func:`toy.world3d.held_out`).
    scenes: int = 3000
    seed: int = 0
    threads: int = 2
    vae_channels: str = "16,32,32"
    unet_channels: str = "32,64,64"
    # VAE
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # text encoder + UNet
    unet_steps: int = 1800
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 100
    cfg_dropout: float = 0.1
    #: 0: the plain v-loss. Min-SNR-5 (the flat recipe's) weights a v-prediction step by
    #: ``min(snr, 5) / (snr + 1)``: under 0.1 above t = 800, the steps that decide where
    #: each solid goes and what colour it is; with it, 12 % of held-out solids landed in
    #: place after 1,800 steps, without it 38 %.
    min_snr_gamma: float = 0.0
    attn_weight: float = 0.5
    ema_decay: float = 0.998
    log_every: int = 50


def scene_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with one token per scene word, ``SCENE_MAX_TOKENS`` long."""
    return local_clip_tokenizer(max_length=SCENE_MAX_TOKENS, words=SCENE_WORDS, whole_words=True)


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def build_scene_models(
    tokenizer: CLIPTokenizer, cfg: SceneTrainConfig
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """Freshly initialised VAE (64x64x3 <-> 16x16x4), text encoder and UNet (fp32), seeded."""
    torch.manual_seed(cfg.seed)
    vae_channels = _channels(cfg.vae_channels)
    unet_channels = _channels(cfg.unet_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1,
        norm_num_groups=min(16, vae_channels[0]),
        sample_size=64,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=SCENE_MAX_TOKENS,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=min(32, unet_channels[0]),
    )
    return vae, text_encoder, unet


__all__ = [
    "SCENE_MAX_TOKENS",
    "SCENE_SCHEDULER_CONFIG",
    "SCENE_SD_DIR",
    "SCENE_WORDS",
    "SceneTrainConfig",
    "build_scene_models",
    "scene_tokenizer",
]
