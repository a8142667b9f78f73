"""From SAM candidates to finished objects: filter, smooth, box, RLE, PNGs.

Smoothing: the binary mask is blurred with a Gaussian of sigma ``smooth_px``
pixels and re-thresholded at 0.5. That rounds corners and removes jaggies and
specks narrower than about ``smooth_px`` without growing or shrinking straight
edges. The RGBA asset's alpha is exactly this smoothed binary mask (0 or 255):
the mask PNG, its RLE, ``area``, ``bbox`` and the asset's opaque pixels always
agree, and colour outside the mask is zeroed, so nothing of the background
leaks into a cut-out.

Duplicates: several prompts of one target (two hot regions of one heat map, the crop
retry, pyramid scales) and the automatic mode's grid points can each find the same
object. :func:`select_objects` keeps an object only when its smoothed mask overlaps no
better-ranked kept object *of the same label* with IoU above :data:`DUPLICATE_IOU`
(non-maximum suppression per label). Objects of different labels are never merged: a
target the request names (a heat-map target, a box, a point) always gets its own best
answer, even when two of them land on one object, so a client that asked for two
things finds both labels in the result.
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

from plumbing.images import encode_png, mask_bbox, rgba_asset

#: Two objects of one image whose masks overlap with a larger IoU are one object twice.
DUPLICATE_IOU = 0.5


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


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks ``[H, W]`` (0 when both are empty)."""
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def _duplicates(obj: SegObject, kept: Iterable[SegObject], max_iou: float) -> bool:
    """Whether ``obj`` overlaps one of ``kept`` with IoU above ``max_iou``."""
    x, y, w, h = obj.bbox
    for other in kept:
        ox, oy, ow, oh = other.bbox
        if x >= ox + ow or ox >= x + w or y >= oy + oh or oy >= y + h:
            continue  # disjoint boxes: IoU 0, no pixel count needed
        small, large = sorted((obj.area, other.area))
        if small <= max_iou * large:
            continue  # IoU <= small / large whatever the overlap
        if mask_iou(obj.mask, other.mask) > max_iou:
            return True
    return False


def select_objects(
    candidates: Iterable[Candidate],
    *,
    min_confidence: float,
    max_objects: int,
    smooth_px: float,
    max_iou: float = DUPLICATE_IOU,
) -> list[SegObject]:
    """Objects from ``candidates``: score >= ``min_confidence``, highest score (or
    ``rank`` when set) first, ties keep candidate order, smoothed, empty ones dropped,
    duplicates dropped (smoothed-mask IoU above ``max_iou`` with a kept object of the
    same label: the better-ranked one stays), at most ``max_objects``."""
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
        obj = SegObject(cand.label, float(cand.score), mask, box, int(mask.sum()))
        if not _duplicates(obj, (o for o in objects if o.label == obj.label), max_iou):
            objects.append(obj)
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


def rgba_png(image: np.ndarray, mask: np.ndarray, crop: tuple[int, int, int, int] | None) -> bytes:
    """PNG of :func:`rgba_asset`."""
    return encode_png(Image.fromarray(rgba_asset(image, mask, crop)))  # RGBA from the shape
