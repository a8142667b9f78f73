"""Train the toy depth model (:mod:`toy.depth_model`) on exact depth maps of the 3D toy
world, on the CPU.

Data (:mod:`toy.depth_data`): ``random_views`` views of random layouts (solids anywhere,
any turn and size, any azimuth) and the four views of ``canonical_scenes`` canonical
scenes (what the scene generator draws), all with training seeds. Loss: L1 between the
logs of predicted and true depth (a relative error, like the AbsRel it is judged by),
with generator-like degradations of the input (colour shifts, blur, noise) and mirror
flips. AdamW with warm-up and cosine decay. Saved with ``save_pretrained`` (model and
processor) so the ``pretrained`` depth path loads it; the AbsRel on ``eval_views``
held-out views (evaluation seeds) is printed and written to ``train_config.json``.

    python -m toy.train_depth --out toy/weights/depth          # the shipped weights
    python -m toy.train_depth --out /tmp/depth --steps 5 --random-views 64 --canonical-scenes 8
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: idle worker threads sleep instead of spinning (see
# toy/train_gen.py: on 2 shared cores spinning made steps many times slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DepthAnythingForDepthEstimation

from seg_worker.depth import DepthEstimator
from toy.depth_data import ViewData, depth_views
from toy.depth_eval import depth_errors
from toy.depth_model import DepthTrainConfig, build_depth_model, depth_processor, normalise
from toy.recipe import recipe_main, warmup_cosine
from toy.world3d import EVAL_SEED_BASE

log = logging.getLogger(__name__)


def degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generator-like degradations of ``images`` ``[B, 3, H, W]`` float 0..255: a colour
    gain and offset per channel, a Gaussian blur of sigma 0..1.2 px, pixel noise."""
    b = images.shape[0]
    gain = 1.0 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.2
    offset = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 24.0
    x = images * gain + offset
    sigma = torch.rand(b, generator=gen).clamp_min(1e-3) * 1.2
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, 5]
    # separable blur per image: grouped convolution over (image, channel) pairs
    flat = x.reshape(1, b * 3, *x.shape[2:])
    k = kernel.repeat_interleave(3, 0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * 3)
    x = flat.reshape_as(x)
    noise = torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 4.0
    return (x + noise).clamp(0, 255)


def train_model(
    model: DepthAnythingForDepthEstimation,
    data: ViewData,
    cfg: DepthTrainConfig,
    gen: torch.Generator,
) -> dict[str, float]:
    """Fit ``model`` to ``data``; returns the last logged loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.steps, min(cfg.warmup, cfg.steps))
    )
    started, running, last = time.monotonic(), 0.0, {}
    for step in range(cfg.steps):
        idx = torch.randint(len(data), (cfg.batch,), generator=gen)
        images = data.images[idx].permute(0, 3, 1, 2).float()
        depth = data.depth[idx]
        flip = torch.rand(cfg.batch, generator=gen) < 0.5
        images[flip], depth[flip] = images[flip].flip(-1), depth[flip].flip(-1)
        pixels = normalise(degrade(images, gen))
        pred = model(pixel_values=pixels).predicted_depth  # [B, H, W], world units
        loss = (pred.clamp_min(1e-3).log() - depth.log()).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            count = (step % cfg.log_every) + 1
            rate = (step + 1) / (time.monotonic() - started)
            last = {"log_l1": running / count}
            log.info(
                "depth step %d/%d  log-L1 %.4f  (%.2f steps/s)",
                step + 1,
                cfg.steps,
                last["log_l1"],
                rate,
            )
            running = 0.0
    model.eval()
    return last


def train(out: Path, cfg: DepthTrainConfig | None = None) -> dict[str, float]:
    """Build the data, train, save to ``out``; returns the held-out errors."""
    cfg = cfg or DepthTrainConfig()
    torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    gen = torch.Generator().manual_seed(cfg.seed)
    log.info("phase: views: %d random, %d canonical scenes", cfg.random_views, cfg.canonical_scenes)
    # Seeds: random layouts from 0, canonical scenes from 500,000 (both below the
    # evaluation seeds).
    data = depth_views(
        range(cfg.random_views),
        range(500_000, 500_000 + cfg.canonical_scenes),
        processes=cfg.threads,
    )
    log.info("phase: depth model: %d steps on %d views", cfg.steps, len(data))
    model = build_depth_model(cfg)
    train_model(model, data, cfg, gen)
    model.requires_grad_(False)
    processor = depth_processor()
    held_out = depth_views(range(EVAL_SEED_BASE, EVAL_SEED_BASE + cfg.eval_views), ())
    errors = depth_errors(DepthEstimator(model, processor), held_out)
    log.info("held-out random views: %s", errors)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    record = {"recipe": asdict(cfg), "held_out": errors}
    (out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("phase: saved to %s after %.0f s", out, time.monotonic() - started)
    return errors


def main(argv: Sequence[str] | None = None) -> None:
    recipe_main(argv, __doc__, DepthTrainConfig, train, "output directory")


if __name__ == "__main__":
    main()
