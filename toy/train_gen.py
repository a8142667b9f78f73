"""Train the ``toy`` Stable Diffusion pipeline on the synthetic world, on the CPU.

The same classes as Stable Diffusion, small (:mod:`toy.gen_model`): a CLIP text
encoder over a word-level vocabulary (:func:`~toy.gen_model.toy_tokenizer`), an
:class:`AutoencoderKL` with factor 4 (64x64 RGB <-> 16x16x4 latents) and a
:class:`UNet2DConditionModel` with cross-attention at 16x16, 8x8 and 4x4. Three phases, all seeded:

1. the world: ``scenes`` training scenes (seeds ``0..scenes-1``);
2. the VAE: L1 + MSE reconstruction and a tiny KL term; then every scene is encoded
   once (latent means) and ``scaling_factor`` set so the latents have unit variance;
3. text encoder + UNet: v-prediction on SD 1.5's noise schedule (the plain v-loss), 10 %
   empty captions (for classifier-free guidance), an EMA of the weights, an *attention
   loss*: on every cross-attention layer, each object's tokens ("red", "circle") should
   put their attention inside that object's mask (the world knows the masks, so the
   heat maps the worker reads from those layers are trained to find the object, not
   left to emerge, as in TokenCompose), and the *shape contrast* (a second pass with
   the shape words swapped must denoise worse: docs/toy.md).

The scene generator (:mod:`toy.train_scene`) runs the phases 2 and 3 of this module on
the 3D world's views.

The result is saved with ``save_pretrained`` as a diffusers directory (fp16
weights), and loads through the ``pretrained`` code path (``SD_MODEL``). This module
holds the phases and the CLI; the data is built in :mod:`toy.gen_data`, the attention
loss, loss weights and EMA are in :mod:`toy.gen_losses`.

    python -m toy.train_gen --out toy/weights/sd           # the shipped weights
    python -m toy.train_gen --out /tmp/sd --vae-steps 5 --unet-steps 5 --scenes 64
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: worker threads that sleep when idle instead of spinning.
# On 2 cores shared with anything else, spinning made training steps 8x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTokenizer

from toy.bf16 import SLOW_BF16, bf16_slowdown
from toy.gen_data import WorldData, load_or_build_data
from toy.gen_losses import (
    EMA,
    AttentionCapture,
    attention_loss,
    cell_weights,
    min_snr_weights,
    shape_contrast,
    shape_swap_table,
)
from toy.gen_model import TOY_SCHEDULER_CONFIG, TrainConfig, build_models, toy_tokenizer
from toy.recipe import LossMeter, recipe_main, warmup_cosine
from toy.world import SHAPES

log = logging.getLogger(__name__)


def autocast(cfg: TrainConfig) -> torch.autocast:
    """bf16 autocast of a training forward pass when ``cfg.precision`` asks for it; the
    weights, the optimiser and the losses stay fp32."""
    device = torch.device(cfg.device).type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def warn_if_bf16_is_slow(cfg: TrainConfig) -> float | None:
    """Log a warning when the recipe's bf16 autocast would run emulated on this CPU (the
    whole recipe then takes days instead of about 1.5 hours); the slowdown measured, or
    None when bf16 is not asked for on the CPU."""
    if cfg.precision != "bf16" or torch.device(cfg.device).type != "cpu":
        return None
    slowdown = bf16_slowdown()
    if slowdown > SLOW_BF16:
        log.warning(
            "this CPU has no fast bf16 (a bf16 matrix product took %.0fx an fp32 one): the "
            "recipe's bf16 steps will run many times slower here. --precision fp32 is "
            "faster on this CPU, but does not reproduce the shipped weights.",
            slowdown,
        )
    return slowdown


# --- phase 2: VAE -----------------------------------------------------------------------


def edge_weights(images: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``[B, 1, H, W]``: 1, plus ``edge_weight`` on shape edges.

    An edge pixel differs from the mean of its 3x3 neighbourhood (by more than 0.05 in
    -1..1 units in some channel); a linear background gradient does not. The outer ring
    of pixels is never an edge (a border pixel's neighbourhood is one-sided, so a
    gradient would count there). Edges are a few percent of the pixels but all that
    tells a star from a circle, so the reconstruction loss counts them more.
    """
    local = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    edges = (images - local).abs().amax(dim=1, keepdim=True) > 0.05
    edges[..., [0, -1], :] = False
    edges[..., :, [0, -1]] = False
    return 1.0 + edge_weight * edges.float()


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    cfg: TrainConfig,
    rng: torch.Generator,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fit the autoencoder to ``images``; returns the last reconstruction losses.

    ``on_step(step)`` after every step (evaluations while exploring).
    """
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.vae_steps, min(100, cfg.vae_steps))
    )
    meter = LossMeter("vae", cfg.vae_steps, cfg.log_every)
    device = next(vae.parameters()).device
    for step in range(cfg.vae_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=rng)].to(device)
        with autocast(cfg):
            posterior = vae.encode(x).latent_dist
            # Decode the mean, not a sample: the UNet is trained on the means (see
            # encode_latents), and a decoder that never sees sampling noise draws sharper
            # edges, which is what tells a square from a circle at 64x64.
            recon = vae.decode(posterior.mean).sample.float()
        weights = edge_weights(x, cfg.vae_edge_weight)
        l1 = ((recon - x).abs() * weights).mean()
        mse = ((recon - x) ** 2 * weights).mean()
        kl = posterior.kl().mean()
        loss = l1 + mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        meter.update(step, l1=l1.item(), mse=mse.item(), kl=kl.item())
        if on_step is not None:
            on_step(step)
    vae.eval()
    return meter.last


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Latent means ``[N, 4, 16, 16]``; sets ``vae.config.scaling_factor`` to 1 / their std."""
    device = next(vae.parameters()).device
    means = torch.cat(
        [
            vae.encode(images[i : i + batch].to(device)).latent_dist.mean.cpu()
            for i in range(0, len(images), batch)
        ]
    )
    std = float(means.std())
    scale = 1.0 / std
    vae.register_to_config(scaling_factor=scale)
    log.info("latents: std %.3f -> scaling_factor %.4f", std, scale)
    return means * scale


# --- phase 3: text encoder + UNet ---------------------------------------------------------


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    data: WorldData,
    cfg: TrainConfig,
    rng: torch.Generator,
    on_step: Callable[[int, EMA, EMA], None] | None = None,
    *,
    tokenizer: CLIPTokenizer | None = None,
    shapes: Sequence[str] = SHAPES,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet (and the text encoder, unless the recipe freezes it); returns their
    EMA copies.

    ``on_step(step, ema_unet, ema_text)`` after every step (snapshots while exploring).
    ``tokenizer`` (default: the flat one) and ``shapes``: the shape words the shape
    contrast swaps.
    """
    scheduler = DDIMScheduler.from_config(TOY_SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    device = next(unet.parameters()).device
    capture = AttentionCapture()
    unet.set_attn_processor(
        {
            name: capture if name.endswith("attn2.processor") else AttnProcessor2_0()
            for name in unet.attn_processors
        }
    )
    unet.train()
    params = list(unet.parameters())
    if cfg.train_text_encoder:
        text_encoder.train()
        params += text_encoder.parameters()
    else:
        text_encoder.eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.unet_steps, cfg.warmup)
    )
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    # Token ids with every shape word swapped, for the shape contrast (when it is on).
    swap = (
        shape_swap_table(tokenizer or toy_tokenizer(), shapes)
        if cfg.shape_contrast_weight > 0
        else None
    )
    meter = LossMeter("unet", cfg.unet_steps, cfg.log_every)
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(latents), (cfg.batch,), generator=rng)
        z0 = latents[idx]
        ids = data.ids[idx].clone()
        token_object = data.token_object[idx].clone()
        dropped = torch.rand(cfg.batch, generator=rng) < cfg.cfg_dropout
        ids[dropped] = data.empty_ids
        token_object[dropped] = -1
        noise = torch.randn(z0.shape, generator=rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=rng)
        zt = scheduler.add_noise(z0, noise, t).to(device)
        target = scheduler.get_velocity(z0, noise, t).to(device)
        weights = min_snr_weights(t, alphas_cumprod, cfg.min_snr_gamma).to(device)

        capture.maps.clear()
        with autocast(cfg):
            embeds = text_encoder(ids.to(device))[0]
            pred = unet(zt, t.to(device), encoder_hidden_states=embeds).sample.float()
        cells = cell_weights(data.masks[idx], cfg.object_cell_weight, cfg.edge_cell_weight)
        per_sample = ((pred - target) ** 2 * cells.to(device)).mean(dim=(1, 2, 3))
        diffusion = (per_sample * weights).mean()
        attn = attention_loss(capture.maps, token_object.to(device), data.masks[idx].to(device))
        loss = diffusion + cfg.attn_weight * attn
        if swap is not None and not bool(dropped.all()):
            kept = ~dropped
            capture.maps.clear()
            with autocast(cfg):
                other = text_encoder(swap[ids[kept]].to(device))[0]
                pred_swapped = unet(zt[kept], t[kept].to(device), encoder_hidden_states=other)
            swapped = (pred_swapped.sample.float() - target[kept]) ** 2 * cells[kept].to(device)
            contrast = shape_contrast(
                per_sample[kept], swapped.mean(dim=(1, 2, 3)), cfg.shape_contrast_margin
            )
            loss = loss + cfg.shape_contrast_weight * contrast

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        meter.update(step, loss=loss.item(), diffusion=diffusion.item(), attn=attn.item())
        if on_step is not None:
            on_step(step, ema_unet, ema_text)
    capture.maps.clear()
    unet.set_attn_processor(AttnProcessor2_0())
    ema_unet.shadow.set_attn_processor(AttnProcessor2_0())
    return ema_unet.shadow, ema_text.shadow


# --- the whole recipe ---------------------------------------------------------------------


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler_config: dict[str, Any],
    recipe: dict[str, Any],
) -> StableDiffusionPipeline:
    """Assemble the trained parts into a pipeline, save it to ``out`` with fp16 weights and
    ``train_config.json`` (``recipe``), and return it in fp32."""
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped size; the pipeline loads it back in the dtype it is asked for.
    pipe.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    (out / "train_config.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return pipe.to(torch.float32)


def train(out: Path, cfg: TrainConfig | None = None) -> StableDiffusionPipeline:
    """Run the three phases and save the pipeline to ``out`` (a diffusers directory)."""
    cfg = cfg or TrainConfig()
    # CPU kernels are deterministic for a fixed thread count; torch's deterministic mode
    # would only add a fill of every new tensor (a third of the step time).
    torch.set_num_threads(cfg.threads)
    tokenizer = toy_tokenizer()
    models = build_models(tokenizer, cfg)
    log.info("phase: world: %d scenes", cfg.scenes)
    data = load_or_build_data(cfg, tokenizer)
    return train_on(out, cfg, tokenizer, models, data)


def train_on(
    out: Path,
    cfg: TrainConfig,
    tokenizer: CLIPTokenizer,
    models: tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel],
    data: WorldData,
    *,
    shapes: Sequence[str] = SHAPES,
) -> StableDiffusionPipeline:
    """Phases 2 and 3 (VAE, then text encoder + UNet; ``shapes``: the words the shape
    contrast swaps) on freshly built ``models`` and ``data``, saved to ``out`` with
    ``cfg`` as its recipe. The scene generator (:mod:`toy.train_scene`) runs it too."""
    warn_if_bf16_is_slow(cfg)
    started = time.monotonic()
    rng = torch.Generator().manual_seed(cfg.seed)
    vae, text_encoder, unet = (m.to(cfg.device) for m in models)
    log.info("phase: vae: %d steps on %d images", cfg.vae_steps, len(data.images))
    train_vae(vae, data.images, cfg, rng)
    vae.requires_grad_(False)
    latents = encode_latents(vae, data.images)
    log.info("phase: text encoder + unet: %d steps", cfg.unet_steps)
    unet, text_encoder = train_denoiser(
        unet, text_encoder, latents, data, cfg, rng, tokenizer=tokenizer, shapes=shapes
    )
    pipe = save_pipeline(out, vae, text_encoder, tokenizer, unet, TOY_SCHEDULER_CONFIG, asdict(cfg))
    log.info("phase: saved to %s after %.0f s of training", out, time.monotonic() - started)
    return pipe


def main(argv: Sequence[str] | None = None) -> None:
    recipe_main(argv, __doc__, TrainConfig, train, "output diffusers directory")


if __name__ == "__main__":
    main()
