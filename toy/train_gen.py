"""Train the ``toy`` Stable Diffusion pipeline on the synthetic world, on the CPU.

The same classes as Stable Diffusion, small: a CLIP text encoder over a word-level
vocabulary (:func:`toy_tokenizer`), an :class:`AutoencoderKL` with factor 4 (64x64
RGB <-> 16x16x4 latents) and a :class:`UNet2DConditionModel` with cross-attention
at 16x16, 8x8 and 4x4. Three phases, all seeded:

1. the world: ``scenes`` training scenes (seeds ``0..scenes-1``);
2. the VAE: L1 + MSE reconstruction and a tiny KL term; then every scene is encoded
   once (latent means) and ``scaling_factor`` set so the latents have unit variance;
3. text encoder + UNet: v-prediction on SD 1.5's noise schedule, min-SNR-5 loss
   weights, 10 % empty captions (for classifier-free guidance), an EMA of the
   weights, and an *attention loss*: on every cross-attention layer, each object's
   tokens ("red", "circle") should put their attention inside that object's mask.
   The world knows the masks, so the heat maps the worker reads from those layers
   are trained to find the object, not left to emerge (as in TokenCompose).

The result is saved with ``save_pretrained`` as a diffusers directory (fp16
weights), and loads through the ``pretrained`` code path (``SD_MODEL``).

    python -m toy.train_gen --out toy/weights/sd           # the shipped weights
    python -m toy.train_gen --out /tmp/sd --vae-steps 5 --unet-steps 5 --scenes 64
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: worker threads that sleep when idle instead of spinning.
# On 2 cores shared with anything else, spinning made training steps 8x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gen_worker.attention import find_token_span
from gen_worker.profiles import SD15_SCHEDULER_CONFIG
from gen_worker.tokenizer import local_clip_tokenizer
from toy.world import PALETTE, SHAPES, WorldConfig, make_scene

log = logging.getLogger(__name__)

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
    vae_channels: str = "16,32,32"
    unet_channels: str = "32,64,64"
    # VAE
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # text encoder + UNet
    unet_steps: int = 3000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    attn_weight: float = 0.5
    ema_decay: float = 0.999
    log_every: int = 50


def toy_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with one token per toy word, ``MAX_TOKENS`` long."""
    return local_clip_tokenizer(max_length=MAX_TOKENS, words=TOY_WORDS, whole_words=True)


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def build_models(
    tokenizer: CLIPTokenizer, cfg: TrainConfig
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """Freshly initialised VAE, text encoder and UNet (fp32), seeded."""
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
        mid_block_add_attention=False,  # flat shapes need no global context; costs time
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
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


# --- data -------------------------------------------------------------------------------


@dataclass
class WorldData:
    """The training scenes as tensors.

    ``images``: ``[N, 3, 64, 64]`` float32 in -1..1; ``ids``: ``[N, L]`` caption token
    ids; ``token_object``: ``[N, L]`` int64, which object (0..2) a token names, -1 for
    none; ``masks``: ``[N, 3, 16, 16]`` float32, each object's coverage of every
    latent cell (the resolution of the largest cross-attention layer).
    """

    images: torch.Tensor
    ids: torch.Tensor
    token_object: torch.Tensor
    masks: torch.Tensor
    empty_ids: torch.Tensor  # [L]: the empty caption (unconditional)


def build_data(
    count: int, tokenizer: CLIPTokenizer, world: WorldConfig | None = None, processes: int = 1
) -> WorldData:
    world = world or WorldConfig()
    if processes > 1:
        with multiprocessing.Pool(processes) as pool:
            scenes = pool.map(partial(make_scene, config=world), range(count), chunksize=256)
    else:
        scenes = [make_scene(i, world) for i in range(count)]
    images = np.empty((count, world.size, world.size, 3), np.uint8)
    ids = np.empty((count, MAX_TOKENS), np.int64)
    token_object = np.full((count, MAX_TOKENS), -1, np.int64)
    # Masks are pooled to the 16x16 cells one object at a time: full-size masks of
    # 20,000 scenes would take 1 GB. Coverage is a multiple of 1/factor^2, exact in float32.
    factor = world.size // 16
    cells = np.zeros((count, world.max_objects, 16, 16), np.float32)
    for i, scene in enumerate(scenes):
        images[i] = scene.image
        row = tokenizer(
            scene.caption, padding="max_length", max_length=MAX_TOKENS, truncation=True
        ).input_ids
        ids[i] = row
        for k, obj in enumerate(scene.objects):
            cells[i, k] = obj.mask.reshape(16, factor, 16, factor).mean(axis=(1, 3))
            token_object[i, find_token_span(tokenizer, row, obj.name)] = k
    empty = tokenizer("", padding="max_length", max_length=MAX_TOKENS).input_ids
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return WorldData(
        pixels,
        torch.from_numpy(ids),
        torch.from_numpy(token_object),
        torch.from_numpy(cells),
        torch.tensor(empty),
    )


def load_or_build_data(cfg: TrainConfig, tokenizer: CLIPTokenizer) -> WorldData:
    """The world of ``cfg``, from ``cfg.world_cache`` when it holds the same number of scenes."""
    cache = Path(cfg.world_cache) if cfg.world_cache else None
    if cache is not None and cache.is_file():
        data = WorldData(**torch.load(cache, weights_only=True))
        if len(data.images) == cfg.scenes:
            log.info("world loaded from %s", cache)
            return data
    data = build_data(cfg.scenes, tokenizer, processes=cfg.threads)
    if cache is not None:
        torch.save(vars(data), cache)
    return data


# --- phase 2: VAE -----------------------------------------------------------------------


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, cfg: TrainConfig, rng: torch.Generator
) -> dict[str, float]:
    """Fit the autoencoder to ``images``; returns the last reconstruction losses."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, cfg.vae_steps, min(100, cfg.vae_steps))
    )
    meter = _Meter("vae", cfg.vae_steps, cfg.log_every)
    device = next(vae.parameters()).device
    for step in range(cfg.vae_steps):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=rng)].to(device)
        posterior = vae.encode(x).latent_dist
        # Decode the mean, not a sample: the UNet is trained on the means (see
        # encode_latents), and a decoder that never sees sampling noise draws sharper
        # edges, which is what tells a square from a circle at 64x64.
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


class AttentionCapture:
    """Cross-attention processor (``attn2``) that keeps its probabilities for the loss.

    Computes the same output as SDPA, from explicit ``softmax(QK^T * scale)``, and
    appends the head-averaged probabilities ``[B, Q, T]`` to :attr:`maps`.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        assert encoder_hidden_states is not None, "only for cross-attention layers"
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [B, heads, Q, T]
        self.maps.append(probs.mean(dim=1))
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def attention_loss(
    maps: Sequence[torch.Tensor], token_object: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """Mean over layers and object tokens of ``1 - share inside`` + ``(map - mask)^2``.

    ``maps``: per layer ``[B, Q, T]``; ``token_object`` ``[B, T]`` (-1: no object);
    ``masks`` ``[B, K, 16, 16]``. ``share inside``: the fraction of a token's spatial
    attention that falls on its object; the squared term on the map scaled to peak 1
    asks the token to cover the whole object, not just a point of it.
    """
    valid = token_object >= 0  # [B, T]
    if not bool(valid.any()):
        return torch.zeros((), device=masks.device)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    total = torch.zeros((), device=masks.device)
    for layer in maps:
        side = math.isqrt(layer.shape[1])
        cells = masks if side == masks.shape[-1] else F.adaptive_avg_pool2d(masks, side)
        target = cells[b_idx, token_object[b_idx, t_idx]].flatten(1)  # [n, Q]
        attn = layer[b_idx, :, t_idx]  # [n, Q]
        inside = (attn * target).sum(dim=1) / attn.sum(dim=1).clamp_min(1e-8)
        peaked = attn / attn.amax(dim=1, keepdim=True).clamp_min(1e-8)
        total = total + (1.0 - inside).mean() + ((peaked - target) ** 2).mean()
    return total / len(maps)


def _min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma loss weights for v-prediction: ``min(snr, gamma) / (snr + 1)``."""
    a = alphas_cumprod[timesteps]
    snr = a / (1.0 - a)
    return snr.clamp(max=gamma) / (snr + 1.0)


class EMA:
    """Exponential moving average of a module's parameters (with warm-up)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - d)


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    data: WorldData,
    cfg: TrainConfig,
    rng: torch.Generator,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet and text encoder together; returns their EMA copies."""
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
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, cfg.unet_steps, cfg.warmup)
    )
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    meter = _Meter("unet", cfg.unet_steps, cfg.log_every)
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
        weights = _min_snr_weights(t, alphas_cumprod, cfg.min_snr_gamma).to(device)

        capture.maps.clear()
        embeds = text_encoder(ids.to(device))[0]
        pred = unet(zt, t.to(device), encoder_hidden_states=embeds).sample
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        diffusion = (per_sample * weights).mean()
        attn = attention_loss(capture.maps, token_object.to(device), data.masks[idx].to(device))
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


class _Meter:
    """Running means of losses, logged every ``every`` steps with the step rate."""

    def __init__(self, name: str, total: int, every: int) -> None:
        self.name, self.total, self.every = name, total, every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last: dict[str, float] = {}
        self.started = time.monotonic()

    def update(self, step: int, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            self.last = {k: v / self.count for k, v in self.sums.items()}
            rate = (step + 1) / (time.monotonic() - self.started)
            losses = " ".join(f"{k} {v:.4f}" for k, v in self.last.items())
            log.info(
                "%s step %d/%d  %s  (%.2f steps/s)", self.name, step + 1, self.total, losses, rate
            )
            self.sums, self.count = {}, 0


# --- the whole recipe ---------------------------------------------------------------------


def train(out: Path, cfg: TrainConfig | None = None) -> StableDiffusionPipeline:
    """Run the three phases and save the pipeline to ``out`` (a diffusers directory)."""
    cfg = cfg or TrainConfig()
    # CPU kernels are deterministic for a fixed thread count; torch's deterministic mode
    # would only add a fill of every new tensor (a third of the step time).
    torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    tokenizer = toy_tokenizer()
    rng = torch.Generator().manual_seed(cfg.seed)
    vae, text_encoder, unet = (m.to(cfg.device) for m in build_models(tokenizer, cfg))

    log.info("phase: world: %d scenes", cfg.scenes)
    data = load_or_build_data(cfg, tokenizer)
    log.info("phase: vae: %d steps", cfg.vae_steps)
    train_vae(vae, data.images, cfg, rng)
    vae.requires_grad_(False)
    latents = encode_latents(vae, data.images)
    log.info("phase: text encoder + unet: %d steps", cfg.unet_steps)
    unet, text_encoder = train_denoiser(unet, text_encoder, latents, data, cfg, rng)

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(TOY_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped size; the pipeline loads it back in the dtype it is asked for.
    pipe.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    (out / "train_config.json").write_text(
        json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8"
    )
    pipe.to(torch.float32)
    log.info("phase: saved to %s after %.0f s", out, time.monotonic() - started)
    return pipe


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output diffusers directory")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, f.name)), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name) is not None
    }
    train(args.out, TrainConfig(**overrides))


if __name__ == "__main__":
    main()
