"""Training data of the toy SAM: scenes as tensors, generator-like augmentation, and
the prompts drawn for each training image (box, box + point, point).

Every random draw comes from the ``torch.Generator`` passed in, so a seeded run draws
the same batches (see :mod:`toy.train_sam`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from toy.world import make_scene


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
    data: ToyData, batch: torch.Tensor, per_kind: int, box_jitter: float, gen: torch.Generator
) -> list[Prompts]:
    """Three prompt groups (box, box+point, point) for the images ``batch`` [B]:
    ``per_kind`` prompts of each kind per image, box edges jittered by up to
    ``box_jitter`` of the box's side."""
    size = data.images.shape[1]
    batch = batch.repeat(per_kind)
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
        image = torch.arange(b) % (b // per_kind)
        if kind == "box":
            boxes = jitter_boxes(data.boxes[obj], box_jitter, size, gen)
            groups.append(Prompts(None, None, boxes, target, image, ambiguous=False))
        elif kind == "box+point":
            boxes = jitter_boxes(data.boxes[obj], box_jitter, size, gen)
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
