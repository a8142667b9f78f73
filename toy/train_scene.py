"""Train the toy scene generator: a Stable Diffusion pipeline that draws a view of a 3D
toy scene from its caption and view ("a red cube and a blue sphere, view from 45
degrees"), on the CPU.

The classes and sizes of the flat toy generator (:mod:`toy.scene_model`), its own
vocabulary (view words) and prompt length. Three phases, all seeded:

1. the world: ``scenes`` canonical scenes of :mod:`toy.world3d`, four views each (held-out
   combinations of solids skipped: the benchmark draws those);
2. the VAE: L1 + MSE reconstruction of the decoded latent mean, a tiny KL term; then
   every view is encoded once and ``scaling_factor`` set for unit-variance latents;
3. text encoder + UNet: v-prediction on SD 1.5's schedule, min-SNR-5 weights, 10 %
   empty captions (classifier-free guidance), EMA of the weights, and the attention loss
   (each solid's tokens attend inside its mask *in that view*), so the worker's heat
   maps point at the solid the target names.

Saved with ``save_pretrained`` (fp16 weights), it loads through the ``pretrained`` code.

    python -m toy.train_scene --out toy/weights/scene_sd     # the shipped weights
    python -m toy.train_scene --out /tmp/ssd --scenes 16 --vae-steps 4 --unet-steps 4
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: idle worker threads sleep instead of spinning (see
# toy/train_gen.py: on 2 shared cores spinning made steps many times slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel

from toy.gen_losses import EMA, AttentionCapture, attention_loss, min_snr_weights
from toy.recipe import LossMeter, recipe_main, warmup_cosine
from toy.scene_data import SceneData, build_scene_data
from toy.scene_model import (
    SCENE_SCHEDULER_CONFIG,
    SceneTrainConfig,
    build_scene_models,
    scene_tokenizer,
)
from toy.train_gen import encode_latents, save_pipeline

log = logging.getLogger(__name__)


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, cfg: SceneTrainConfig, rng: torch.Generator
) -> dict[str, float]:
    """Fit the autoencoder to ``images`` ``[N, 3, 64, 64]`` in -1..1."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.vae_steps, min(100, cfg.vae_steps))
    )
    meter = LossMeter("vae", cfg.vae_steps, cfg.log_every)
    for step in range(cfg.vae_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=rng)]
        posterior = vae.encode(x).latent_dist
        # Decode the mean: the UNet learns the means, and a decoder that never sees
        # sampling noise draws sharper edges (see toy/train_gen.py).
        recon = vae.decode(posterior.mean).sample
        l1 = (recon - x).abs().mean()
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean()
        loss = l1 + mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        meter.update(step, l1=l1.item(), mse=mse.item(), kl=kl.item())
    vae.eval()
    return meter.last


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    data: SceneData,
    cfg: SceneTrainConfig,
    rng: torch.Generator,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet and text encoder together; returns their EMA copies."""
    scheduler = DDIMScheduler.from_config(SCENE_SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    capture = AttentionCapture()
    unet.set_attn_processor(
        {
            name: capture if name.endswith("attn2.processor") else AttnProcessor2_0()
            for name in unet.attn_processors
        }
    )
    unet.train()
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.unet_steps, min(cfg.warmup, cfg.unet_steps))
    )
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
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
        zt = scheduler.add_noise(z0, noise, t)
        target = scheduler.get_velocity(z0, noise, t)
        weights = (
            min_snr_weights(t, alphas_cumprod, cfg.min_snr_gamma)
            if cfg.min_snr_gamma > 0
            else torch.ones(cfg.batch)
        )

        capture.maps.clear()
        embeds = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=embeds).sample
        diffusion = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
        attn = attention_loss(capture.maps, token_object, data.masks[idx])
        loss = diffusion + cfg.attn_weight * attn

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        meter.update(step, loss=loss.item(), diffusion=diffusion.item(), attn=attn.item())
    capture.maps.clear()
    unet.set_attn_processor(AttnProcessor2_0())
    ema_unet.shadow.set_attn_processor(AttnProcessor2_0())
    return ema_unet.shadow, ema_text.shadow


def train(out: Path, cfg: SceneTrainConfig | None = None) -> StableDiffusionPipeline:
    """Run the three phases and save the pipeline to ``out`` (a diffusers directory)."""
    cfg = cfg or SceneTrainConfig()
    # CPU kernels are deterministic for a fixed thread count.
    torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    tokenizer = scene_tokenizer()
    rng = torch.Generator().manual_seed(cfg.seed)
    vae, text_encoder, unet = build_scene_models(tokenizer, cfg)

    log.info("phase: world: %d canonical scenes", cfg.scenes)
    data = build_scene_data(cfg.scenes, tokenizer, processes=cfg.threads)
    log.info("phase: vae: %d steps on %d views", cfg.vae_steps, len(data.images))
    train_vae(vae, data.images, cfg, rng)
    vae.requires_grad_(False)
    latents = encode_latents(vae, data.images)
    log.info("phase: text encoder + unet: %d steps", cfg.unet_steps)
    unet, text_encoder = train_denoiser(unet, text_encoder, latents, data, cfg, rng)

    pipe = save_pipeline(
        out, vae, text_encoder, tokenizer, unet, SCENE_SCHEDULER_CONFIG, asdict(cfg)
    )
    log.info("phase: saved to %s after %.0f s", out, time.monotonic() - started)
    return pipe


def main(argv: Sequence[str] | None = None) -> None:
    recipe_main(argv, __doc__, SceneTrainConfig, train, "output diffusers directory")


if __name__ == "__main__":
    main()
