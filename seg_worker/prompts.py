"""SAM prompts from heat maps, explicit boxes and explicit points. Pure numpy.

Coordinates are pixels of the image the prompt is meant for, origin at the
top-left corner, x to the right; boxes given to SAM are ``[x0, y0, x1, y1]``
with ``x1 = x + w`` (exclusive edge), as in SAM's own examples.

Heat map to prompts (``attention`` mode): the heat map (0..1, peak 1.0 after
:func:`plumbing.images.decode_heatmap`) is resized to the image, thresholded at
``threshold`` times its peak (0.5 by default: a region at least half as
attended as the most attended position), and split into 8-connected components.
Each component gives one prompt: its bounding box plus one foreground point at
its most attended pixel. Components are ordered by attention mass (the sum of
the heat inside them), so the largest, most attended region comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from schemas import Point

#: Default heat-map threshold, as a fraction of the heat map's peak.
HEAT_THRESHOLD = 0.5


@dataclass(eq=False)
class Prompt:
    """One SAM prompt: points and/or a box, for one object labelled ``label``."""

    label: str
    #: ``[N, 2]`` float32 (x, y) in pixels; N may be 0.
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    #: ``[N]`` int32, 1 = foreground, 0 = background.
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    #: ``[4]`` float32 ``x0, y0, x1, y1`` in pixels, or None.
    box: np.ndarray | None = None
    #: Attention mass of the heat-map component (ordering only; 0 for explicit prompts).
    weight: float = 0.0

    def shifted(self, dx: float, dy: float) -> Prompt:
        """The same prompt in a frame whose origin is at ``(dx, dy)`` of this one."""
        offset = np.array([dx, dy], np.float32)
        box = None if self.box is None else self.box - np.tile(offset, 2)
        return Prompt(self.label, self.points - offset, self.point_labels, box, self.weight)


def resize_heatmap(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float heat map ``[h, w]`` to ``[height, width]`` (float32)."""
    if heat.shape == (height, width):
        return heat.astype(np.float32, copy=False)
    image = Image.fromarray(np.ascontiguousarray(heat, np.float32))  # mode F
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def heatmap_prompts(
    heat: np.ndarray,
    label: str,
    *,
    threshold: float = HEAT_THRESHOLD,
    max_prompts: int | None = None,
) -> list[Prompt]:
    """Box + peak-point prompts, one per connected hot region of ``heat`` ``[H, W]``.

    ``heat`` is already at the image's size. Returns at most ``max_prompts``
    prompts, most attention mass first; none when the heat map is flat zero.
    """
    peak = float(heat.max(initial=0.0))
    if not np.isfinite(peak) or peak <= 0.0:
        return []
    hot = heat >= threshold * peak
    components, count = ndimage.label(hot, structure=np.ones((3, 3), bool))
    if count == 0:
        return []
    # bincount and per-slice argmax: ndimage.maximum_position costs ~10 ms at 512 px
    masses = np.bincount(components.ravel(), weights=heat.ravel(), minlength=count + 1)
    prompts = []
    for k, (ys, xs) in enumerate(ndimage.find_objects(components), start=1):
        local = np.where(components[ys, xs] == k, heat[ys, xs], -np.inf)
        py, px = np.unravel_index(int(np.argmax(local)), local.shape)
        prompts.append(
            Prompt(
                label=label,
                points=np.array([[xs.start + px, ys.start + py]], np.float32),
                point_labels=np.ones((1,), np.int32),
                box=np.array([xs.start, ys.start, xs.stop, ys.stop], np.float32),
                weight=float(masses[k]),
            )
        )
    prompts.sort(key=lambda p: -p.weight)  # stable: ties keep raster order
    return prompts[:max_prompts] if max_prompts is not None else prompts


def box_prompts(
    boxes: Sequence[Sequence[float]], targets: Sequence[str], height: int, width: int
) -> list[Prompt]:
    """One prompt per ``[x, y, w, h]`` box, clipped to the image, labelled
    ``targets[i]`` or ``box-{i}``. Boxes entirely outside the image are dropped."""
    prompts = []
    for i, (x, y, w, h) in enumerate(boxes):
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            continue
        label = targets[i] if i < len(targets) else f"box-{i}"
        prompts.append(Prompt(label=label, box=np.array([x0, y0, x1, y1], np.float32)))
    return prompts


def point_prompts(points: Sequence[Point], targets: Sequence[str]) -> list[Prompt]:
    """One prompt per foreground point (label 1), each with every background point
    (label 0) as a negative; labelled ``targets[i]`` or ``point-{i}`` (i counts
    foreground points). Background points alone give no prompt."""
    negatives = [(p.x, p.y) for p in points if p.label == 0]
    prompts = []
    for i, p in enumerate(q for q in points if q.label == 1):
        coords = np.array([(p.x, p.y), *negatives], np.float32)
        labels = np.array([1] + [0] * len(negatives), np.int32)
        label = targets[i] if i < len(targets) else f"point-{i}"
        prompts.append(Prompt(label=label, points=coords, point_labels=labels))
    return prompts


def crop_around(
    center: tuple[float, float],
    region: np.ndarray | None,
    height: int,
    width: int,
    *,
    min_side: int = 32,
) -> tuple[int, int, int, int]:
    """A square crop ``(x0, y0, x1, y1)`` around ``center`` (x, y) for a small object.

    Side: twice the larger side of ``region`` (an ``x0, y0, x1, y1`` box, e.g. the
    heat-map component), at least ``min_side`` px and an eighth of the image's
    long side, at most half the long side; shifted to stay inside the image.
    """
    long_side = max(height, width)
    extent = 0.0 if region is None else float(max(region[2] - region[0], region[3] - region[1]))
    side = int(max(2 * extent, min_side, long_side / 8))
    side = max(1, min(side, max(long_side // 2, 1)))
    w, h = min(side, width), min(side, height)
    x0 = round(center[0] - w / 2)
    y0 = round(center[1] - h / 2)
    x0 = min(max(x0, 0), width - w)
    y0 = min(max(y0, 0), height - h)
    return x0, y0, x0 + w, y0 + h
