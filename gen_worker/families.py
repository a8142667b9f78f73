"""What differs between the SD 1.5 and SDXL pipelines, behind one set of functions.

The generator (:mod:`gen_worker.generate`) calls diffusers pipelines with text
embeddings it computed itself (per prompt on the CPU, for batch-invariant images) and
decodes latents itself (one sample at a time). How to do both depends on the family:

- ``sd15``: one CLIP text encoder; ``prompt_embeds`` ``[B, 77, D]``;
- ``sdxl``: two text encoders whose penultimate hidden states are concatenated along
  the feature axis (``[B, 77, 768 + 1280]``: one token sequence, so a target's token
  positions are those of the first tokenizer), plus the second encoder's pooled,
  projected output ``[B, 1280]`` for the UNet's ``text_time`` embedding; a VAE that
  is decoded in float32 when the pipeline runs in float16 (``force_upcast``).

The family of a pipeline is read from its class (:func:`family_of`), so a plug-in
profile needs to declare nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

Family = Literal["sd15", "sdxl"]
#: The values of ``GENSEG_SD_ARCH``.
FAMILIES: tuple[str, ...] = get_args(Family)

#: diffusers' SDXL pipeline classes (base and inpainting models).
XL_PIPELINES = (
    StableDiffusionXLPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)


def check_family(value: str) -> Family:
    """``value`` as a :data:`Family`; ValueError (one line, naming the setting) if unknown."""
    if value not in FAMILIES:
        raise ValueError(
            f"GENSEG_SD_ARCH={value!r} is not a generator architecture: use one of "
            f"{', '.join(FAMILIES)}"
        )
    return value  # type: ignore[return-value]


def family_of(pipe: Any) -> Family:
    """``sdxl`` for diffusers' SDXL pipelines (and their subclasses), else ``sd15``."""
    return "sdxl" if isinstance(pipe, XL_PIPELINES) else "sd15"


def _xl_extras(pipe: Any) -> dict[str, Any]:
    return {
        "force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt,
        "add_watermarker": False,  # latents are decoded here; no invisible watermark
    }


def img2img_for(pipe: Any) -> Any:
    """An img2img pipeline sharing every component of the text-to-image ``pipe``."""
    if family_of(pipe) == "sdxl":
        return StableDiffusionXLImg2ImgPipeline(
            **pipe.components, requires_aesthetics_score=False, **_xl_extras(pipe)
        )
    return StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)


def xl_inpaint_for(pipe: Any) -> StableDiffusionXLInpaintPipeline:
    """SDXL inpainting with the components of the text-to-image ``pipe`` (its 4-channel
    UNet: diffusers blends the known region back at each step)."""
    return StableDiffusionXLInpaintPipeline(
        **pipe.components, requires_aesthetics_score=False, **_xl_extras(pipe)
    )


def span_tokenizer(pipe: Any) -> Any:
    """The tokenizer whose token positions index the cross-attention context."""
    return pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2


# --- text conditioning ------------------------------------------------------------------


def encode(
    pipe: Any,
    prompts: Sequence[str],
    negatives: Sequence[str | None],
    cfg: bool,
    device: torch.device,
    *,
    per_prompt: bool,
) -> dict[str, torch.Tensor | None]:
    """The text-conditioning keyword arguments of a pipeline call for ``prompts``.

    ``negatives[i]``: the negative prompt of sample ``i`` (None: none given).
    ``per_prompt``: run the text encoders one prompt at a time (batch-invariant results).
    Keys: ``prompt_embeds`` ``[B, 77, D]``, ``negative_prompt_embeds`` (None without
    guidance) and, for SDXL, ``pooled_prompt_embeds`` ``[B, P]`` and
    ``negative_pooled_prompt_embeds``.
    """
    if family_of(pipe) == "sdxl":
        return _encode_xl(pipe, prompts, negatives, cfg, device, per_prompt)
    return _encode_sd15(pipe, prompts, negatives, cfg, device, per_prompt)


def _encode_sd15(
    pipe: Any,
    prompts: Sequence[str],
    negatives: Sequence[str | None],
    cfg: bool,
    device: torch.device,
    per_prompt: bool,
) -> dict[str, torch.Tensor | None]:
    # No negative prompt: the empty one, as diffusers' SD 1.5 pipeline does.
    texts = [n or "" for n in negatives]
    if not per_prompt:
        embeds, negative = pipe.encode_prompt(list(prompts), device, 1, cfg, negative_prompt=texts)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    pos, neg = [], []
    for p, n in zip(prompts, texts, strict=True):
        e, ne = pipe.encode_prompt(p, device, 1, cfg, negative_prompt=n)
        pos.append(e)
        neg.append(ne)
    return {
        "prompt_embeds": torch.cat(pos),
        "negative_prompt_embeds": torch.cat(neg) if cfg else None,
    }


def _encode_xl_texts(
    pipe: Any, texts: Sequence[str], device: torch.device, per_prompt: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[n, 77, D]`` and pooled embeddings ``[n, P]`` of ``texts``.

    A negative prompt is encoded the same way as a prompt (diffusers' negative branch
    tokenizes and reads the same hidden states), so one path serves both.
    """
    if not texts:
        return torch.empty(0), torch.empty(0)
    groups = [[t] for t in texts] if per_prompt else [list(texts)]
    embeds, pooled = [], []
    for group in groups:
        e, _, p, _ = pipe.encode_prompt(
            group, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def _encode_xl(
    pipe: Any,
    prompts: Sequence[str],
    negatives: Sequence[str | None],
    cfg: bool,
    device: torch.device,
    per_prompt: bool,
) -> dict[str, torch.Tensor | None]:
    embeds, pooled = _encode_xl_texts(pipe, prompts, device, per_prompt)
    out: dict[str, torch.Tensor | None] = {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": None,
        "negative_pooled_prompt_embeds": None,
    }
    if not cfg:
        return out
    # SDXL base: no negative prompt means zero embeddings (force_zeros_for_empty_prompt),
    # decided per sample so that a sample's conditioning never depends on its batch.
    zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    texts = {i: n or "" for i, n in enumerate(negatives) if n is not None or not zeros}
    neg, neg_pooled = _encode_xl_texts(pipe, list(texts.values()), device, per_prompt)
    rows = {i: k for k, i in enumerate(texts)}
    out["negative_prompt_embeds"] = torch.stack(
        [neg[rows[i]] if i in rows else torch.zeros_like(embeds[i]) for i in range(len(prompts))]
    )
    out["negative_pooled_prompt_embeds"] = torch.stack(
        [
            neg_pooled[rows[i]] if i in rows else torch.zeros_like(pooled[i])
            for i in range(len(prompts))
        ]
    )
    return out


# --- decoding ---------------------------------------------------------------------------


def decode(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents ``[B, 4, h, w]`` -> PIL images, one sample at a time (memory, determinism).

    SDXL: in float32 when the VAE says so (``force_upcast``: SDXL's VAE overflows in
    float16), and with the latent mean/std when its config has them.
    """
    vae = pipe.vae
    xl = family_of(pipe) == "sdxl"
    # Copied from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl.
    # StableDiffusionXLPipeline.__call__ (diffusers 0.42.1, the decode at its end); changes:
    # per sample, and only for SDXL (the SD 1.5 pipeline never upcasts).
    upcast = xl and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        _cast(vae, torch.float32)
    mean = getattr(vae.config, "latents_mean", None) if xl else None
    std = getattr(vae.config, "latents_std", None) if xl else None
    try:
        images: list[Image.Image] = []
        for i in range(latents.shape[0]):
            z = latents[i : i + 1].to(vae.dtype)
            if mean is not None and std is not None:
                m = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
                s = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
                z = z * s / vae.config.scaling_factor + m
            else:
                z = z / vae.config.scaling_factor
            x = vae.decode(z, return_dict=False)[0]
            images.extend(pipe.image_processor.postprocess(x, output_type="pil"))
    finally:
        if upcast:
            _cast(vae, torch.float16)
    return images


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without diffusers' warning about casting with ``to()`` (said
    on every cast of a VAE, i.e. twice a batch here)."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        module.to(dtype=dtype)
    finally:
        logger.setLevel(level)


__all__ = [
    "FAMILIES",
    "XL_PIPELINES",
    "Family",
    "check_family",
    "decode",
    "encode",
    "family_of",
    "img2img_for",
    "span_tokenizer",
    "xl_inpaint_for",
]
