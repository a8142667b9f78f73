"""Train the toy Segment Anything on :mod:`toy.world` scenes, on the CPU.

The model is the real segment-anything :class:`~segment_anything.modeling.Sam`
(``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) in
the :data:`toy.profiles.TOY_SAM_ARCH` configuration, built by
:func:`seg_worker.profiles.build_sam`. This module is the training loop and the CLI;
the data and prompts are in :mod:`toy.sam_data`, the forward pass and losses in
:mod:`toy.sam_losses`, the evaluation in :mod:`toy.sam_eval`.

Recipe (after SAM's): every image gets one prompt of each kind, on one of its objects

- ``box``: the object's box, every edge jittered by up to :attr:`Recipe.box_jitter`
  of the box's size (the attention mode's boxes come from thresholded heat maps);
- ``box+point``: such a box plus one foreground point inside the object (the
  attention mode's prompt: box plus the heat map's peak);
- ``point``: one point (the automatic mode's grid): inside an object, or anywhere in
  the image; a point on the background must yield a low predicted IoU, so the
  automatic mode keeps objects only (its target mask is empty, its IoU target 0).

The decoder's three multimask outputs are trained with the minimum of their mask
losses (BCE + dice), the single output (index 0) on the unambiguous box prompts, and
the IoU head with MSE against the true IoU of every output's thresholded mask: the
worker picks an output and filters objects by predicted IoU (``min_confidence``).

Images are augmented to look like a small generator's samples: slight colour
shifts, Gaussian blur (sigma 0-1 px), pixel noise and low-frequency blotches, and
sometimes a 2x down-and-up resize. The masks stay those of the drawing.

Deterministic on the CPU for a given seed, step count and thread count: the CLI pins
one torch thread (``--threads``; one thread also keeps its pace when another job
shares a 2-core machine) so ``python -m toy.train_sam`` reproduces the shipped
``toy/weights/sam.safetensors`` (1,200 steps, about 9 minutes on this machine)::

    nice -n 10 python -m toy.train_sam --out toy/weights/sam.safetensors --eval
    python -m toy.train_sam --eval toy/weights/sam.safetensors  # evaluate only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from segment_anything.modeling import Sam

from seg_worker.profiles import build_sam
from toy.profiles import TOY_SAM_ARCH
from toy.sam_data import ToyData, augment, sample_prompts
from toy.sam_eval import evaluate_sam, load_trained
from toy.sam_losses import encode, prompt_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters (the defaults reproduce the shipped weights)."""

    steps: int = 1200
    batch: int = 16  # images per step
    per_kind: int = 2  # prompts of each kind (box, box+point, point) per image
    scenes: int = 6000  # training scenes drawn once (seeds 0..scenes-1)
    lr: float = 1e-3
    min_lr: float = 2e-5
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    box_jitter: float = 0.2  # max edge shift, as a fraction of the box side
    iou_weight: float = 1.0
    seed: int = 0


# --- training ---------------------------------------------------------------------------


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * t))


def train_sam(
    recipe: Recipe | None = None,
    *,
    data: ToyData | None = None,
    log_every: int = 50,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Sam:
    """Train a toy SAM following ``recipe``; returns it in eval mode (no grads)."""
    recipe = recipe or Recipe()
    started = time.perf_counter()
    if data is None:
        data = ToyData.from_seeds(range(recipe.scenes))
        log.info("drew %d training scenes in %.1f s", recipe.scenes, time.perf_counter() - started)
    assert max(len(o) for o in data.objects) > 0
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = build_sam(TOY_SAM_ARCH, seed=recipe.seed)
    model.train()
    model.requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "rel_pos" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "rel_pos" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.999),
    )
    n = len(data.objects)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    tick, running = time.perf_counter(), {}
    for step in range(recipe.steps):
        if cursor + recipe.batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        batch = order[cursor : cursor + recipe.batch]
        cursor += recipe.batch
        images = augment(data.images[batch].permute(0, 3, 1, 2).float(), gen)
        groups = sample_prompts(data, batch, recipe.per_kind, recipe.box_jitter, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        embeddings = encode(model, images)
        loss = torch.zeros(())
        stats: dict[str, float] = {}
        for kind, prompts in zip(("box", "boxpt", "pt"), groups, strict=True):
            part, s = prompt_loss(model, embeddings, prompts, recipe.iou_weight)
            loss = loss + part
            stats.update({f"{kind}_{k}": v for k, v in s.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        stats["loss"] = float(loss.detach())
        for k, v in stats.items():
            running[k] = running.get(k, 0.0) + v
        if on_step is not None:
            on_step(step, stats)
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            count = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            now = time.perf_counter()
            mean = {k: v / count for k, v in running.items()}
            log.info(
                "step %d/%d  %.2f steps/s  loss %.4f  box IoU %.3f  box+pt IoU %.3f  pt IoU %.3f"
                "  iou mse %.4f  lr %.2e",
                step + 1,
                recipe.steps,
                count / (now - tick),
                mean["loss"],
                mean["box_iou"],
                mean["boxpt_iou"],
                mean["pt_iou"],
                (mean["box_iou_mse"] + mean["boxpt_iou_mse"] + mean["pt_iou_mse"]) / 3,
                lr_at(step, recipe),
            )
            tick, running = now, {}
    log.info("trained %d steps in %.1f s", recipe.steps, time.perf_counter() - started)
    model.eval()
    model.requires_grad_(False)
    return model


def save_sam(model: Sam, path: str | Path, *, fp16: bool = False) -> Path:
    """The state dict as safetensors (contiguous, cloned tensors; fp16 if asked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    # One metadata key: safetensors writes a map in arbitrary order, so two would make the
    # bytes of the file differ from run to run.
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toy.train_sam", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, help="where to save the weights (.safetensors)")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--scenes", type=int, default=Recipe.scenes)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the result depends on it)"
    )
    parser.add_argument(
        "--eval",
        type=Path,
        nargs="?",
        const=True,
        default=None,
        help="evaluate the trained model (or the weights at this path, without training)",
    )
    parser.add_argument("--eval-scenes", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if isinstance(args.eval, Path) and args.out is None:
        model = load_trained(args.eval)
    else:
        if args.out is None:
            parser.error("--out is required to train")
        recipe = Recipe(steps=args.steps, seed=args.seed, scenes=args.scenes)
        log.info("recipe %s, arch %s", asdict(recipe), TOY_SAM_ARCH)
        model = train_sam(recipe)
        path = save_sam(model, args.out)
        params = sum(p.numel() for p in model.parameters())
        print(f"saved {path} ({params / 1e6:.2f} M parameters, {path.stat().st_size / 1e6:.2f} MB)")
    if args.eval is not None:
        print(json.dumps(evaluate_sam(model, scenes=args.eval_scenes)))


if __name__ == "__main__":
    main()
