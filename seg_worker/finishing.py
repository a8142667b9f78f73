"""From SAM candidates to finished objects: filter, smooth, box, RLE, PNGs.

Smoothing: the binary mask is blurred with a Gaussian of sigma ``smooth_px``
pixels and re-thresholded at 0.5. That rounds corners and removes jaggies and
specks narrower than about ``smooth_px`` without growing or shrinking straight
edges. The RGBA asset's alpha is exactly this smoothed binary mask (0 or 255):
the mask PNG, its RLE, ``area``, ``bbox`` and the asset's opaque pixels always
agree, and colour outside the mask is zeroed, so nothing of the background
leaks into a cut-out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from plumbing.images import encode_png


@dataclass(eq=False)
class Candidate:
    """A mask SAM proposed for ``label``: the best of its multimask outputs, or an
    instance of a text concept."""

    label: str
    score: float  # SAM predicted IoU (mean over pyramid scales); SAM 3 confidence
    mask: np.ndarray  # [H, W] bool, full image size
    #: Order key when it is not ``score`` (attention+concept: the heat share held).
    rank: float | None = None

    @property
    def order(self) -> float:
        return self.score if self.rank is None else self.rank


@dataclass(eq=False)
class SegObject:
    """A finished object: smoothed mask and its box and area."""

    label: str
    score: float
    mask: np.ndarray  # [H, W] bool, smoothed
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels
    area: int  # pixels


def passes(candidate: Candidate, min_confidence: float) -> bool:
    """Score at least ``min_confidence`` and a non-empty mask."""
    return candidate.score >= min_confidence and bool(candidate.mask.any())


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x, y, w, h)`` of the set pixels of ``mask`` ``[H, W]``; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def smooth_mask(mask: np.ndarray, smooth_px: float) -> np.ndarray:
    """Gaussian blur (sigma ``smooth_px`` px) and re-threshold at 0.5; bool ``[H, W]``.

    Only the mask's box padded by the filter's reach is blurred: farther pixels
    are 0 before and after, so this equals blurring the whole frame, at a cost
    proportional to the object rather than the image.
    """
    if smooth_px <= 0:
        return mask.astype(bool, copy=True)
    box = mask_bbox(mask)
    out = np.zeros(mask.shape, bool)
    if box is None:
        return out
    reach = math.ceil(4.0 * smooth_px) + 1  # gaussian_filter truncates at 4 sigma
    x, y, w, h = box
    y0, y1 = max(0, y - reach), min(mask.shape[0], y + h + reach)
    x0, x1 = max(0, x - reach), min(mask.shape[1], x + w + reach)
    # mode="nearest": an object touching the image border keeps touching it
    blurred = ndimage.gaussian_filter(
        mask[y0:y1, x0:x1].astype(np.float32), sigma=smooth_px, mode="nearest"
    )
    out[y0:y1, x0:x1] = blurred >= 0.5
    return out


def select_objects(
    candidates: Iterable[Candidate],
    *,
    min_confidence: float,
    max_objects: int,
    smooth_px: float,
) -> list[SegObject]:
    """Objects from ``candidates``: score >= ``min_confidence``, highest score (or
    ``rank`` when set) first, ties keep candidate order, smoothed, empty ones dropped,
    at most ``max_objects``."""
    kept = [c for c in candidates if c.score >= min_confidence]
    kept.sort(key=lambda c: -c.order)
    objects: list[SegObject] = []
    for cand in kept:
        if len(objects) >= max_objects:
            break
        mask = smooth_mask(cand.mask, smooth_px)
        box = mask_bbox(mask)
        if box is None:
            continue
        objects.append(SegObject(cand.label, float(cand.score), mask, box, int(mask.sum())))
    return objects


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    """COCO RLE of ``mask`` ``[H, W]``: ``{"size": [H, W], "counts": str}`` (compressed)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, object]) -> np.ndarray:
    """Bool ``[H, W]`` mask of an :func:`encode_rle` result."""
    counts = rle["counts"]
    raw = {"size": list(rle["size"]), "counts": counts.encode("ascii")}  # type: ignore[union-attr,arg-type]
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(raw).astype(bool)


def mask_png(mask: np.ndarray) -> bytes:
    """PNG (mode L) of ``mask``: 255 inside, 0 outside."""
    return encode_png(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))


def rgba_asset(
    image: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int] | None
) -> np.ndarray:
    """RGBA ``[h, w, 4]`` uint8 cut-out of ``image`` ``[H, W, 3]``: alpha = 255 * mask,
    colour zeroed outside; cropped to ``crop`` = (x, y, w, h) when given."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask, :3] = image[mask]
    rgba[mask, 3] = 255
    if crop is not None:
        x, y, w, h = crop
        rgba = rgba[y : y + h, x : x + w]
    return rgba


def rgba_png(image: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int] | None) -> bytes:
    """PNG of :func:`rgba_asset`."""
    return encode_png(Image.fromarray(rgba_asset(image, mask, crop)))  # RGBA from the shape
