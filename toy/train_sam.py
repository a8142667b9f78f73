"""Train the toy Segment Anything on :mod:`toy.world` scenes, on the CPU.

The model is the real segment-anything :class:`~segment_anything.modeling.Sam`
(``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) in
the ``toy`` configuration of :data:`seg_worker.profiles.ARCHS`, built by
:func:`seg_worker.profiles.build_sam`. ``Sam.forward`` runs under ``no_grad``, so the
training forward is written here from the model's own parts: ``Sam.preprocess``
(normalise and pad), the image encoder, the prompt encoder and the mask decoder's
layers (:func:`decode`, which is ``MaskDecoder.predict_masks`` with one image
embedding per prompt instead of one image for all prompts).

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

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from seg_worker.profiles import ARCHS, build_sam
from toy.world import EVAL_SEED_BASE, make_scene

log = logging.getLogger(__name__)

ARCH = "toy"


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


# --- data -------------------------------------------------------------------------------


@dataclass
class ToyData:
    """Scenes as tensors: ``images`` [N, H, W, 3] uint8; ``owner`` [N, H, W] int32,
    the index into ``masks`` of the object at each pixel or -1; ``masks`` [M, H, W]
    bool; ``boxes`` [M, 4] float ``x0, y0, x1, y1`` (exclusive ends); ``objects`` [N]
    lists of object indices per image."""

    images: torch.Tensor
    owner: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    objects: list[list[int]]

    @classmethod
    def from_seeds(cls, seeds: range | list[int]) -> ToyData:
        images, owner, masks, boxes, objects = [], [], [], [], []
        for seed in seeds:
            scene = make_scene(seed)
            own = np.full(scene.image.shape[:2], -1, np.int32)
            ids = []
            for obj in scene.objects:
                own[obj.mask] = len(masks)
                ids.append(len(masks))
                masks.append(obj.mask)
                boxes.append(obj.box)
            images.append(scene.image)
            owner.append(own)
            objects.append(ids)
        return cls(
            torch.from_numpy(np.stack(images)),
            torch.from_numpy(np.stack(owner)),
            torch.from_numpy(np.stack(masks)),
            torch.tensor(boxes, dtype=torch.float32),
            objects,
        )


def _gaussian_kernels(sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """1-D Gaussian kernels [B, 2r+1], one per sigma (sigma 0: identity)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generator-like degradations of ``images`` [B, 3, H, W] float 0..255."""
    b, c, h, w = images.shape
    x = images
    # Colour: per-channel gain and offset, a shared brightness shift.
    gain = 1.0 + (torch.rand(b, c, 1, 1, generator=gen) - 0.5) * 0.16
    offset = (torch.rand(b, c, 1, 1, generator=gen) - 0.5) * 20.0
    bright = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 30.0
    x = x * gain + offset + bright
    # Sometimes a 2x down-and-up resize (a 32 px generator, or the pyramid's 0.5 scale).
    coarse = torch.rand(b, generator=gen) < 0.2
    if coarse.any():
        small = F.interpolate(x[coarse], scale_factor=0.5, mode="bilinear", antialias=True)
        x = x.clone()
        x[coarse] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # Gaussian blur, sigma 0..1 px (separable, per image).
    sigma = torch.rand(b, generator=gen) * 1.0
    k = _gaussian_kernels(sigma).repeat_interleave(c, dim=0)  # [B*C, 5]
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=b * c)
    x = flat.reshape(b, c, h, w)
    # Pixel noise and low-frequency blotches (a diffusion sample's speckle and tint).
    pix = torch.rand(b, 1, 1, 1, generator=gen) * 8.0
    x = x + torch.randn(b, c, h, w, generator=gen) * pix
    blot = torch.rand(b, 1, 1, 1, generator=gen) * 10.0
    low = torch.randn(b, c, h // 8, w // 8, generator=gen) * blot
    x = x + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 255.0)


@dataclass
class Prompts:
    """One kind of prompt for a batch: ``points`` [P, K, 2] and ``labels`` [P, K] or
    None; ``boxes`` [P, 4] or None; ``target`` [P, H, W] float; ``image`` [P] index
    into the batch; ``ambiguous``: train the multimask outputs only."""

    points: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None
    target: torch.Tensor
    image: torch.Tensor
    ambiguous: bool


def jitter_boxes(boxes: torch.Tensor, frac: float, size: int, gen: torch.Generator) -> torch.Tensor:
    """Every edge of ``boxes`` [P, 4] moved by up to ``frac`` of the box's side."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    shift = (torch.rand(boxes.shape, generator=gen) * 2 - 1) * frac * wh
    out = (boxes + shift).clamp(0, size)
    x0 = torch.minimum(out[:, 0], out[:, 2] - 2)
    y0 = torch.minimum(out[:, 1], out[:, 3] - 2)
    return torch.stack([x0, y0, out[:, 2], out[:, 3]], dim=1).clamp(0, size)


def random_point_in(masks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One uniformly drawn (x, y) pixel inside each of ``masks`` [P, H, W] (non-empty)."""
    p, _h, w = masks.shape
    weights = masks.reshape(p, -1).float() + 1e-9
    idx = torch.multinomial(weights, 1, generator=gen)[:, 0]
    return torch.stack([idx % w, idx // w], dim=1).float()


def sample_prompts(
    data: ToyData, batch: torch.Tensor, recipe: Recipe, gen: torch.Generator
) -> list[Prompts]:
    """Three prompt groups (box, box+point, point) for the images ``batch`` [B]."""
    size = data.images.shape[1]
    batch = batch.repeat(recipe.per_kind)
    b = len(batch)
    groups = []
    for kind in ("box", "box+point", "point"):
        picks = torch.randint(0, 1 << 30, (b,), generator=gen)
        obj = torch.tensor(
            [
                data.objects[int(i)][int(r) % len(data.objects[int(i)])]
                for i, r in zip(batch, picks, strict=True)
            ]
        )
        target = data.masks[obj].float()
        image = torch.arange(b) % (b // recipe.per_kind)
        if kind == "box":
            boxes = jitter_boxes(data.boxes[obj], recipe.box_jitter, size, gen)
            groups.append(Prompts(None, None, boxes, target, image, ambiguous=False))
        elif kind == "box+point":
            boxes = jitter_boxes(data.boxes[obj], recipe.box_jitter, size, gen)
            points = random_point_in(data.masks[obj], gen)[:, None]
            labels = torch.ones(b, 1, dtype=torch.int64)
            groups.append(Prompts(points, labels, boxes, target, image, ambiguous=False))
        else:
            # Half inside the chosen object, half uniform in the image (grid-like): a
            # background point's target is empty (its IoU target becomes 0).
            inside = random_point_in(data.masks[obj], gen)
            anywhere = torch.randint(0, size, (b, 2), generator=gen).float()
            use_any = torch.rand(b, generator=gen) < 0.5
            points = torch.where(use_any[:, None], anywhere, inside)
            owner = data.owner[batch, points[:, 1].long(), points[:, 0].long()]
            hit = data.masks[owner.clamp_min(0)].float() * (owner >= 0).float()[:, None, None]
            target = torch.where(use_any[:, None, None], hit, target)
            labels = torch.ones(b, 1, dtype=torch.int64)
            groups.append(Prompts(points[:, None], labels, None, target, image, ambiguous=True))
    return groups


# --- model forward ----------------------------------------------------------------------


def encode(model: Sam, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings of ``images`` [B, 3, H, W] float 0..255 (H, W = img_size)."""
    return model.image_encoder(model.preprocess(images))


def decode(
    model: Sam, embeddings: torch.Tensor, prompts: Prompts
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits [P, 4, h, w] and predicted IoUs [P, 4] of all four outputs.

    ``MaskDecoder.predict_masks``, with ``embeddings[prompts.image]`` as the image
    embedding of each prompt instead of one image repeated for every prompt.
    """
    points = None if prompts.points is None else (prompts.points, prompts.labels)
    sparse, dense = model.prompt_encoder(points=points, boxes=prompts.boxes, masks=None)
    dec = model.mask_decoder
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings[prompts.image] + dense
    pos = model.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos, tokens)
    iou_out = hs[:, 0, :]
    mask_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack(
        [mlp(mask_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = up.shape
    masks = (hyper @ up.view(b, c, h * w)).view(b, -1, h, w)
    return masks, dec.iou_prediction_head(iou_out)


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + dice per prompt and output: ``logits`` [P, C, H, W], ``target`` [P, H, W]."""
    t = target[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(dim=(2, 3))
    prob = logits.sigmoid()
    inter = (prob * t).sum(dim=(2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1.0)
    return bce + dice


def true_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU [P, C] of each output's mask (logit > threshold) with ``target``; 0 where the
    target is empty (a background prompt should score low)."""
    pred = logits.detach() > threshold
    t = target[:, None].bool()
    inter = (pred & t).sum(dim=(2, 3)).float()
    union = (pred | t).sum(dim=(2, 3)).float()
    empty = t.sum(dim=(2, 3)) == 0
    return torch.where(empty, torch.zeros_like(union), inter / union.clamp_min(1.0))


def prompt_loss(
    model: Sam, embeddings: torch.Tensor, prompts: Prompts, recipe: Recipe
) -> tuple[torch.Tensor, dict[str, float]]:
    masks, iou_pred = decode(model, embeddings, prompts)
    size = model.image_encoder.img_size
    if masks.shape[-1] != size:
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
    losses = mask_losses(masks, prompts.target)  # [P, 4]
    multi = losses[:, 1:].min(dim=1).values
    mask_loss = multi.mean()
    if not prompts.ambiguous:
        mask_loss = mask_loss + losses[:, 0].mean()
    ious = true_iou(masks, prompts.target, model.mask_threshold)
    iou_loss = F.mse_loss(iou_pred, ious)
    stats = {
        "mask": float(mask_loss.detach()),
        "iou_mse": float(iou_loss.detach()),
        "iou": float(ious.max(1)[0].mean()),
    }
    return mask_loss + recipe.iou_weight * iou_loss, stats


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
    model = build_sam(ARCH, seed=recipe.seed)
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
        groups = sample_prompts(data, batch, recipe, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        embeddings = encode(model, images)
        loss = torch.zeros(())
        stats: dict[str, float] = {}
        for kind, prompts in zip(("box", "boxpt", "pt"), groups, strict=True):
            part, s = prompt_loss(model, embeddings, prompts, recipe)
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


# --- evaluation -------------------------------------------------------------------------


def evaluate_sam(
    model: Sam, *, scenes: int = 100, seed_base: int = EVAL_SEED_BASE, min_confidence: float = 0.8
) -> dict[str, float]:
    """Mean IoU on the objects of ``scenes`` evaluation scenes through ``SamPredictor``
    (multimask output, best by predicted IoU, as the worker does) for a ground-truth box,
    a jittered box plus a point inside, and the object's centre point; and the IoU
    head's calibration over those predictions (mean absolute error, and how well
    ``predicted IoU >= min_confidence`` separates true IoUs >= that), plus the share of
    background points whose prediction would pass ``min_confidence``."""
    predictor = SamPredictor(model)
    gen = torch.Generator().manual_seed(1234)
    ious: dict[str, list[float]] = {"box": [], "box_point": [], "point": []}
    pred_all, true_all, bg_pass = [], [], []
    for seed in range(seed_base, seed_base + scenes):
        scene = make_scene(seed)
        predictor.set_image(scene.image)
        masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
        size = scene.image.shape[0]
        inside = random_point_in(masks, gen)
        centres = torch.tensor([o.center for o in scene.objects], dtype=torch.float32).floor()
        tf = predictor.transform
        shape = scene.image.shape[:2]
        cases = {
            "box": (None, None, boxes),
            "box_point": (
                inside[:, None],
                torch.ones(len(masks), 1),
                jitter_boxes(boxes, 0.2, size, gen),
            ),
            "point": (centres[:, None], torch.ones(len(masks), 1), None),
        }
        for name, (pts, lab, bx) in cases.items():
            out, scores, _ = predictor.predict_torch(
                None if pts is None else tf.apply_coords_torch(pts, shape),
                lab,
                None if bx is None else tf.apply_boxes_torch(bx, shape),
                multimask_output=True,
            )
            best = scores.argmax(dim=1)
            chosen = out[torch.arange(len(best)), best]
            t = true_iou(chosen[:, None].float(), masks.float(), 0.5)[:, 0]
            ious[name] += t.tolist()
            pred_all += scores[torch.arange(len(best)), best].tolist()
            true_all += t.tolist()
        # Background points: pixels owned by no object, a few per scene.
        free = ~masks.any(dim=0)
        bg = random_point_in(free[None].expand(3, -1, -1), gen)[:, None]
        _, scores, _ = predictor.predict_torch(
            tf.apply_coords_torch(bg, shape), torch.ones(3, 1), None, multimask_output=True
        )
        bg_pass += (scores.max(dim=1).values >= min_confidence).tolist()
    pred, true = np.array(pred_all), np.array(true_all)
    accepted = pred >= min_confidence
    good = true >= min_confidence
    return {
        "objects": len(ious["box"]),
        "box_miou": float(np.mean(ious["box"])),
        "box_point_miou": float(np.mean(ious["box_point"])),
        "point_miou": float(np.mean(ious["point"])),
        "iou_head_mae": float(np.abs(pred - true).mean()),
        "iou_head_bias": float((pred - true).mean()),
        "accept_precision": float(good[accepted].mean()) if accepted.any() else 0.0,
        "accept_recall": float(accepted[good].mean()) if good.any() else 0.0,
        "background_pass_rate": float(np.mean(bg_pass)),
    }


def load_trained(path: str | Path) -> Sam:
    """The toy SAM with the weights in ``path`` (through the pretrained code path)."""
    from seg_worker.profiles import load_sam

    return load_sam("toy", ARCH, checkpoint=str(path))


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
        log.info("recipe %s, arch %s", asdict(recipe), ARCHS[ARCH])
        model = train_sam(recipe)
        path = save_sam(model, args.out)
        params = sum(p.numel() for p in model.parameters())
        print(f"saved {path} ({params / 1e6:.2f} M parameters, {path.stat().st_size / 1e6:.2f} MB)")
    if args.eval is not None:
        print(json.dumps(evaluate_sam(model, scenes=args.eval_scenes)))


if __name__ == "__main__":
    main()
