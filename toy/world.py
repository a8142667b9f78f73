"""A synthetic world of coloured shapes where the right answer is known.

A :class:`Scene` is a square RGB image of one to three shapes (circle, square,
triangle, star) in distinct colours on a plain or gradient grey background, its
caption ("a red circle next to a blue square") and the exact mask of every object.
Everything follows from one integer seed (:func:`make_scene`).

Shapes are drawn at 4x and box-filtered down, so edges are anti-aliased; an
object's mask is where its coverage is at least one half, which is also where its
colour dominates the pixel (objects never overlap).

:func:`find_object` goes the other way, for images the generator made: the largest
connected region of pixels nearest to an asked colour. :func:`classify_shape`
names the shape of such a region by comparing it with each ideal shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

#: Object colours, RGB. Saturated and far apart, so a colour identifies its object,
#: and never grey, so no object colour is a background colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 40),
    "purple": (170, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

#: Supersampling factor of the drawing (anti-aliased edges).
SUPERSAMPLE = 4
#: Seeds of the evaluation scenes (bench/quality.py) start here; training seeds stay below.
EVAL_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class WorldConfig:
    """Sizes in pixels of the ``size`` x ``size`` image."""

    size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    #: Object radius range (the circle's radius; other shapes have about its area).
    radius: tuple[float, float] = (9.0, 14.0)
    #: Free pixels kept between two objects' bounding circles.
    gap: float = 2.0
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES


@dataclass(frozen=True)
class WorldObject:
    """One drawn object. ``mask``: ``[H, W]`` bool; ``box``: ``x0, y0, x1, y1`` (x1, y1
    exclusive), pixels."""

    colour: str
    shape: str
    center: tuple[float, float]
    radius: float
    mask: np.ndarray = field(repr=False)

    @property
    def name(self) -> str:
        """The object as a caption names it and a request targets it: ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return mask_box(self.mask)


@dataclass(frozen=True)
class Scene:
    """``image``: ``[H, W, 3]`` uint8 RGB; ``objects`` in caption order."""

    seed: int
    image: np.ndarray = field(repr=False)
    objects: tuple[WorldObject, ...]
    caption: str


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``x0, y0, x1, y1`` (exclusive ends) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask has no box")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --- drawing ----------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of an upright ``shape`` centred on ``(cx, cy)`` with size ``r`` (pixels).

    Sizes give every shape roughly the area of a circle of radius ``r``.
    """
    if shape == "square":
        h = r * 0.89  # side 1.78 r: area 3.2 r^2, a circle's pi r^2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = r * 1.3  # circumradius; the centroid sits at (cx, cy)
        return [
            (cx + R * math.cos(a), cy - R * math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
        ]
    if shape == "star":
        outer, inner = r * 1.3, r * 0.6
        points = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rad = outer if k % 2 == 0 else inner
            points.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Fraction ``[size, size]`` float32 in 0..1 of each pixel that ``shape`` covers."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    # Pixel centres are at +0.5: scale the continuous coordinates, not the pixel indices.
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in shape_polygon(shape, cx, cy, r)], fill=255)
    big = np.asarray(canvas, np.float32) / 255.0
    return big.reshape(size, s, size, s).mean(axis=(1, 3))


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain or linear-gradient grey background ``[size, size, 3]`` float32 (0..255)."""
    a, b = rng.uniform(70, 235, size=2)
    if rng.random() < 0.4:
        b = a
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    t = np.clip(0.5 + xs * math.cos(angle) + ys * math.sin(angle), 0.0, 1.0)
    grey = a + (b - a) * t
    return np.repeat(grey[:, :, None], 3, axis=2)


def caption(objects: Sequence[tuple[str, str]], rng: np.random.Generator | None = None) -> str:
    """``"a red circle"``, ``"a red circle next to a blue square"`` (or ``and``),
    ``"a red circle, a blue square and a green star"``."""
    names = [f"a {colour} {shape}" for colour, shape in objects]
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        joiner = " next to " if rng is None or rng.random() < 0.5 else " and "
        return joiner.join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _place(
    rng: np.random.Generator, radii: Sequence[float], config: WorldConfig
) -> list[tuple[float, float]] | None:
    """Centres for objects of ``radii`` inside the image, apart by ``config.gap``."""
    margin = 1.4  # triangles and stars reach 1.3 r from their centre
    centres: list[tuple[float, float]] = []
    for r in radii:
        lo, hi = r * margin, config.size - r * margin
        for _ in range(100):
            c = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            if all(
                math.dist(c, o) >= margin * (r + ro) + config.gap
                for o, ro in zip(centres, radii, strict=False)
            ):
                centres.append(c)
                break
        else:
            return None
    return centres


def make_scene(seed: int, config: WorldConfig | None = None) -> Scene:
    """The scene of ``seed``: the same image, caption and masks on every machine."""
    config = config or WorldConfig()
    rng = np.random.default_rng(seed)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    colours = [config.colours[i] for i in rng.permutation(len(config.colours))[:count]]
    shapes = [config.shapes[int(rng.integers(len(config.shapes)))] for _ in range(count)]
    while True:
        radii = [float(rng.uniform(*config.radius)) for _ in range(count)]
        centres = _place(rng, radii, config)
        if centres is not None:
            break
    image = background(rng, config.size)
    objects = []
    for colour, shape, (cx, cy), r in zip(colours, shapes, centres, radii, strict=True):
        cov = coverage(shape, cx, cy, r, config.size)[:, :, None]
        image = image * (1.0 - cov) + np.asarray(PALETTE[colour], np.float32) * cov
        objects.append(WorldObject(colour, shape, (cx, cy), r, cov[:, :, 0] >= 0.5))
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    text = caption(list(zip(colours, shapes, strict=True)), rng)
    return Scene(seed, pixels, tuple(objects), text)


def iter_scenes(seeds: Sequence[int] | range, config: WorldConfig | None = None) -> Iterator[Scene]:
    for seed in seeds:
        yield make_scene(seed, config)


def parse_target(target: str) -> tuple[str, str]:
    """``"red circle"`` -> ``("red", "circle")``; ValueError for anything else."""
    words = target.lower().split()
    if len(words) != 2 or words[0] not in PALETTE or words[1] not in SHAPES:
        raise ValueError(f"not a toy object {target!r}: expected '<colour> <shape>'")
    return words[0], words[1]


# --- finding objects in generated images ----------------------------------------------


def colour_labels(
    image: np.ndarray, *, min_share: float = 0.47, min_cos: float = 0.85
) -> np.ndarray:
    """Per pixel, the index into ``PALETTE`` of its colour, or -1 (background).

    Works on chroma (a pixel minus its grey level): a pixel that blends palette colour
    ``c`` with share ``a`` over a grey background has ``a`` times ``c``'s chroma. So a
    pixel is ``c`` where its chroma points the way of ``c``'s (cosine at least
    ``min_cos``) and reaches ``min_share`` of its length. Coverage comes in sixteenths
    (4x supersampling), so 0.47 splits 0.4375 from 0.5 with room for uint8 rounding:
    on a drawn scene this is exactly the object's mask, whatever the grey behind it.
    """
    rgb = image.astype(np.float32)
    chroma = rgb - rgb.mean(axis=-1, keepdims=True)
    palette = np.asarray(list(PALETTE.values()), np.float32)
    pc = palette - palette.mean(axis=-1, keepdims=True)  # [K, 3]
    dots = chroma @ pc.T  # [H, W, K]
    share = dots / (pc**2).sum(axis=-1)
    norms = np.linalg.norm(chroma, axis=-1, keepdims=True) * np.linalg.norm(pc, axis=-1)
    cos = dots / np.maximum(norms, 1e-6)
    best = cos.argmax(axis=-1)
    ok = (np.take_along_axis(cos, best[..., None], -1)[..., 0] >= min_cos) & (
        np.take_along_axis(share, best[..., None], -1)[..., 0] >= min_share
    )
    return np.where(ok, best, -1)


def find_object(
    image: np.ndarray, colour: str, shape: str | None = None, *, min_area: int = 12
) -> np.ndarray | None:
    """Mask ``[H, W]`` bool of the largest 8-connected region of ``colour`` in ``image``,
    holes filled; None when there is none of at least ``min_area`` pixels.

    With ``shape``, a region that :func:`classify_shape` names ``shape`` comes before
    a larger one that it does not: a generated image may hold two objects of the asked
    colour, and the asked object is the one of the asked shape.
    """
    labels = colour_labels(image)
    region = labels == list(PALETTE).index(colour)
    components, count = ndimage.label(region, structure=np.ones((3, 3), bool))
    if count == 0:
        return None
    areas = np.bincount(components.ravel())[1:]
    candidates = []
    for k in np.flatnonzero(areas >= min_area):
        mask = ndimage.binary_fill_holes(components == k + 1)
        right = shape is not None and classify_shape(mask)[0] == shape
        candidates.append((right, int(areas[k]), -int(k), mask))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[:3])[3]


def _template(shape: str, width: int, height: int) -> np.ndarray:
    """The ideal ``shape`` stretched to a ``width`` x ``height`` box, bool."""
    big = 64
    cov = coverage(shape, big / 2, big / 2 + (3 if shape in ("triangle", "star") else 0), 20, big)
    x0, y0, x1, y1 = mask_box(cov >= 0.5)
    crop = Image.fromarray((cov[y0:y1, x0:x1] * 255).astype(np.uint8))
    return np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR)) >= 128


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose ideal form best matches ``mask`` within its box, and that IoU."""
    x0, y0, x1, y1 = mask_box(mask)
    region = mask[y0:y1, x0:x1]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        ideal = _template(shape, x1 - x0, y1 - y0)
        inter = np.logical_and(region, ideal).sum()
        union = np.logical_or(region, ideal).sum()
        score = float(inter / union) if union else 0.0
        if score > best_iou:
            best, best_iou = shape, score
    return best, best_iou


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


__all__ = [
    "EVAL_SEED_BASE",
    "PALETTE",
    "SHAPES",
    "Scene",
    "WorldConfig",
    "WorldObject",
    "caption",
    "classify_shape",
    "colour_labels",
    "coverage",
    "find_object",
    "iou",
    "iter_scenes",
    "make_scene",
    "mask_box",
    "parse_target",
]
