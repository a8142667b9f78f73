"""Network configurations of the built-in generator profiles, and their seeded random
weights.

- :func:`tiny_architecture`: a few-MB SD-shaped model (the ``tiny`` profile);
- :func:`sd15_architecture`: Stable Diffusion 1.5's sizes (the ``random`` profile);
- :func:`build_random_components`: pipeline components of an :class:`Architecture`
  with weights drawn from a fixed seed, the same in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from gen_worker.tokenizer import local_clip_tokenizer

#: Seed of the random weights of the ``tiny`` and ``random`` profiles. Fixed so that every
#: process builds the same model, hence the same image for the same request.
WEIGHTS_SEED = 20240229

SD15_VOCAB_SIZE = 49408

#: The SD 1.5 noise schedule (its scheduler_config.json); samplers are built from it.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Architecture:
    """Configurations of one profile's networks (diffusers/transformers config kwargs)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer_vocab_size: int | None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))


def tiny_architecture() -> Architecture:
    """A few-MB SD-shaped model: VAE factor 8, cross-attention at two UNet resolutions."""
    return Architecture(
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 32,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (8, 16, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
        tokenizer_vocab_size=None,
    )


def sd15_architecture() -> Architecture:
    """Stable Diffusion 1.5: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M."""
    return Architecture(
        unet={
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "sample_size": 512,
        },
        text_encoder={
            "vocab_size": SD15_VOCAB_SIZE,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        tokenizer_vocab_size=SD15_VOCAB_SIZE,
    )


def build_random_components(
    arch: Architecture, *, inpaint: bool = False, seed: int = WEIGHTS_SEED
) -> dict[str, Any]:
    """Pipeline components with seeded random weights (fp32, CPU).

    The global RNG is forked, so building models never disturbs the caller's random
    state, and the weights depend on ``seed`` only (identical in every process).
    ``inpaint``: a UNet with 9 input channels (latents + mask + masked-image latents).
    """
    tokenizer = local_clip_tokenizer(arch.tokenizer_vocab_size)
    text_cfg = dict(arch.text_encoder)
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet_cfg = dict(arch.unet)
    if inpaint:
        unet_cfg["in_channels"] = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**arch.vae)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler.from_config(arch.scheduler),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_tiny_pipeline(*, inpaint: bool = False) -> StableDiffusionPipeline:
    """The ``tiny`` text-to-image (or inpainting) pipeline, fp32 on the CPU."""
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(**build_random_components(tiny_architecture(), inpaint=inpaint))


__all__ = [
    "SD15_SCHEDULER_CONFIG",
    "SD15_VOCAB_SIZE",
    "WEIGHTS_SEED",
    "Architecture",
    "build_random_components",
    "build_tiny_pipeline",
    "sd15_architecture",
    "tiny_architecture",
]
