"""Network configurations of the built-in generator profiles, and their seeded random
weights.

- :func:`tiny_architecture`: a few-MB SD-shaped model (the ``tiny`` profile);
- :func:`sd15_architecture`: Stable Diffusion 1.5's sizes (the ``random`` profile);
- :func:`tiny_xl_architecture`, :func:`sdxl_architecture`: the same two for SDXL
  (``GENSEG_SD_ARCH=sdxl``): two text encoders, the ``text_time`` added conditioning;
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
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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

#: SDXL base 1.0's noise schedule (its scheduler_config.json, an EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

#: SDXL's VAE latent scale (SD 1.5: 0.18215, diffusers' default).
SDXL_VAE_SCALING = 0.13025


@dataclass(frozen=True)
class Architecture:
    """Configurations of one profile's networks (diffusers/transformers config kwargs)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer_vocab_size: int | None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))
    #: SDXL's second text encoder (``CLIPTextModelWithProjection``: its pooled, projected
    #: output feeds the UNet's ``text_time`` embedding); None: one encoder (SD 1.5).
    text_encoder_2: dict[str, Any] | None = None

    @property
    def family(self) -> str:
        """``sd15`` or ``sdxl``: which diffusers pipelines run these networks."""
        return "sd15" if self.text_encoder_2 is None else "sdxl"


def _sd15_vae(scaling_factor: float | None = None, sample_size: int = 512) -> dict[str, Any]:
    """SD 1.5's VAE (SDXL's has the same shape, another latent scale)."""
    vae: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": sample_size,
    }
    if scaling_factor is not None:
        vae["scaling_factor"] = scaling_factor
    return vae


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
        vae=_sd15_vae(),
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


def tiny_xl_architecture() -> Architecture:
    """A few-MB SDXL-shaped model: two text encoders (32 features each, concatenated to
    the UNet's 64-feature cross-attention context), the ``text_time`` added embedding
    (pooled text 32 + six size/crop numbers x 8), no attention at the first UNet level
    (as in SDXL), two transformer layers at the second; VAE factor 8."""
    tiny = tiny_architecture()
    return Architecture(
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "cross_attention_dim": 64,
            "norm_num_groups": 32,
        },
        # No float32 upcast: the tiny model runs in float32 anyway (SDXL's own VAE needs it
        # in float16, and ``sdxl_architecture`` keeps diffusers' default, True).
        vae={**tiny.vae, "scaling_factor": SDXL_VAE_SCALING, "force_upcast": False},
        text_encoder=dict(tiny.text_encoder),
        text_encoder_2={**tiny.text_encoder, "hidden_act": "gelu"},
        tokenizer_vocab_size=None,
        scheduler=dict(SDXL_SCHEDULER_CONFIG),
    )


def sdxl_architecture() -> Architecture:
    """SDXL base 1.0: UNet 2.57B, VAE 84M, CLIP ViT-L/14 123M + OpenCLIP ViT-bigG/14 695M."""
    sd15 = sd15_architecture()
    return Architecture(
        unet={
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 x 256
            "cross_attention_dim": 2048,  # 768 + 1280, the two encoders concatenated
            "norm_num_groups": 32,
        },
        vae=_sd15_vae(SDXL_VAE_SCALING, sample_size=1024),
        text_encoder=dict(sd15.text_encoder),
        text_encoder_2={
            "vocab_size": SD15_VOCAB_SIZE,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
        tokenizer_vocab_size=SD15_VOCAB_SIZE,
        scheduler=dict(SDXL_SCHEDULER_CONFIG),
    )


def _text_config(cfg: dict[str, Any], tokenizer: Any) -> CLIPTextConfig:
    cfg = dict(cfg)
    cfg.setdefault("vocab_size", len(tokenizer))
    cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**cfg)


def build_random_components(
    arch: Architecture, *, inpaint: bool = False, seed: int = WEIGHTS_SEED
) -> dict[str, Any]:
    """Pipeline components with seeded random weights (fp32, CPU), as keyword arguments
    of the architecture's pipeline class (SD 1.5's or SDXL's).

    The global RNG is forked, so building models never disturbs the caller's random
    state, and the weights depend on ``seed`` only (identical in every process).
    ``inpaint``: a UNet with 9 input channels (latents + mask + masked-image latents).
    """
    tokenizer = local_clip_tokenizer(arch.tokenizer_vocab_size)
    unet_cfg = dict(arch.unet)
    if inpaint:
        unet_cfg["in_channels"] = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**arch.vae)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(arch.text_encoder, tokenizer))
        if arch.text_encoder_2 is not None:
            # SDXL's second tokenizer pads with "!" where the first repeats the end token;
            # the ids up to the end token are the same (one token sequence, see attention.py).
            tokenizer_2 = local_clip_tokenizer(arch.tokenizer_vocab_size, pad_token="!")
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(arch.text_encoder_2, tokenizer_2)
            )
    common = {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "feature_extractor": None,
    }
    if arch.text_encoder_2 is None:
        return {
            **common,
            "scheduler": DDIMScheduler.from_config(arch.scheduler),
            "safety_checker": None,
            "requires_safety_checker": False,
        }
    return {
        **common,
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer_2,
        "scheduler": EulerDiscreteScheduler.from_config(arch.scheduler),
        "image_encoder": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,  # we decode latents ourselves; no invisible watermark
    }


def pipeline_classes(family: str) -> tuple[type[Any], type[Any]]:
    """(text-to-image, inpainting) pipeline classes of ``sd15`` or ``sdxl``."""
    if family == "sdxl":
        return StableDiffusionXLPipeline, StableDiffusionXLInpaintPipeline
    return StableDiffusionPipeline, StableDiffusionInpaintPipeline


def build_random_pipeline(arch: Architecture, *, inpaint: bool = False) -> Any:
    """The text-to-image (or inpainting) pipeline of ``arch`` with seeded random weights."""
    txt2img, inpainting = pipeline_classes(arch.family)
    cls = inpainting if inpaint else txt2img
    return cls(**build_random_components(arch, inpaint=inpaint))


def build_tiny_pipeline(*, inpaint: bool = False) -> StableDiffusionPipeline:
    """The ``tiny`` text-to-image (or inpainting) pipeline, fp32 on the CPU."""
    return build_random_pipeline(tiny_architecture(), inpaint=inpaint)


def build_tiny_xl_pipeline(*, inpaint: bool = False) -> StableDiffusionXLPipeline:
    """The ``tiny`` SDXL text-to-image (or inpainting) pipeline, fp32 on the CPU."""
    return build_random_pipeline(tiny_xl_architecture(), inpaint=inpaint)


__all__ = [
    "SD15_SCHEDULER_CONFIG",
    "SD15_VOCAB_SIZE",
    "SDXL_SCHEDULER_CONFIG",
    "SDXL_VAE_SCALING",
    "WEIGHTS_SEED",
    "Architecture",
    "build_random_components",
    "build_random_pipeline",
    "build_tiny_pipeline",
    "build_tiny_xl_pipeline",
    "pipeline_classes",
    "sd15_architecture",
    "sdxl_architecture",
    "tiny_architecture",
    "tiny_xl_architecture",
]
