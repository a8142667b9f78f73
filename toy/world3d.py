"""The toy world in 3D: coloured solids on a floor, seen from an orbiting camera.

A :class:`Scene3D` holds one to three solids (cube, sphere, cone, cylinder) in distinct
colours of the flat world's :data:`toy.world.PALETTE`, standing on the floor ``y = 0``,
and their views: for each camera azimuth, an RGB image with an **exact mask** per solid
and an **exact depth map**, rendered here by numpy ray casting (analytic intersections,
Lambert shading, the floor's shadows, 3x3 supersampling). Cameras follow
:data:`scene_worker.camera.DEFAULT_ORBIT` (elevation 30 degrees, distance 7, 35 degrees of
field of view; see that module for the axes): the scene stage back-projects views
with the same cameras.

Two layouts:

- ``canonical`` (the generator's world): **the caption fixes the scene**. The k-th named
  solid stands on slot ``SLOTS[k]``, with its shape's fixed size and turn, on a floor of
  grey :data:`CANONICAL_FLOOR`. A view is then a function of caption and azimuth, so views
  generated one by one (one request per view) can agree: a diffusion model maps
  noise to *some* layout, and nothing would make four independent samples pick the
  same one. The slots are placed so that no solid hides another from 0, 45, 90 or 135
  degrees.
- ``random`` (the depth model's world): any positions in a disc, turns and sizes, any
  floor grey (100 to 190) and azimuth, so depth is learnt from geometry rather than
  from the slots.

Units: world units ("metres"); depth is z-depth along the camera's axis (see
:mod:`scene_worker.camera`). Everything follows from one seed (:func:`make_scene3d`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scene_worker.camera import DEFAULT_ORBIT, CameraPose, OrbitCamera
from toy.world import PALETTE

SOLIDS: tuple[str, ...] = ("cube", "sphere", "cone", "cylinder")
#: The source article's four views (camera azimuths, degrees).
VIEWS: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
#: Floor positions ``(x, z)`` of the first, second and third named solid (canonical).
SLOTS: tuple[tuple[float, float], ...] = ((1.19, 0.53), (-1.05, 0.76), (-0.14, -1.29))
#: Half-extent (radius or half side) and height of each solid at scale 1, world units.
DIMENSIONS: dict[str, tuple[float, float]] = {
    "cube": (0.4, 0.8),
    "sphere": (0.45, 0.9),
    "cone": (0.5, 1.0),
    "cylinder": (0.4, 0.9),
}
#: Turn of a canonical cube about the vertical, degrees (so no face is square-on to 0).
CUBE_YAW = 20.0
#: The floor's grey in canonical scenes: fixed, so a caption and a view fix the image.
CANONICAL_FLOOR = 150.0
#: Evaluation seeds (benches) start here; training seeds stay below.
EVAL_SEED_BASE = 1_000_000
#: The light: a direction towards it (world), ambient and diffuse shares.
LIGHT = np.array([-0.45, 1.0, 0.6]) / np.linalg.norm([-0.45, 1.0, 0.6])
AMBIENT, DIFFUSE, SHADOW = 0.55, 0.5, 0.62
SUPERSAMPLE = 3


@dataclass(frozen=True)
class Solid:
    """One solid standing on the floor at ``(x, z)``, turned ``yaw_deg`` about the
    vertical, scaled by ``scale`` from :data:`DIMENSIONS`."""

    colour: str
    shape: str
    x: float
    z: float
    yaw_deg: float = 0.0
    scale: float = 1.0

    @property
    def name(self) -> str:
        """As a caption names it and a request targets it: ``"red cube"``."""
        return f"{self.colour} {self.shape}"

    @property
    def radius(self) -> float:
        """Half-extent on the floor (the cube's half side, others' base radius)."""
        return DIMENSIONS[self.shape][0] * self.scale

    @property
    def height(self) -> float:
        return DIMENSIONS[self.shape][1] * self.scale

    @property
    def footprint(self) -> float:
        """Radius of the floor disc the solid stands in (a cube's corners reach further)."""
        return self.radius * (math.sqrt(2.0) if self.shape == "cube" else 1.0)

    @property
    def centre(self) -> np.ndarray:
        """The middle of its bounding box ``[3]``: what "the object's position" means."""
        return np.array([self.x, self.height / 2, self.z])


@dataclass(frozen=True)
class View:
    """One rendered view. ``image`` ``[H, W, 3]`` uint8; ``depth`` ``[H, W]`` float32
    z-depth (world units); ``masks`` ``[K, H, W]`` bool, one per solid in caption order
    (a pixel belongs to what covers at least 5 of its 9 samples)."""

    azimuth: float
    image: np.ndarray = field(repr=False)
    depth: np.ndarray = field(repr=False)
    masks: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Scene3D:
    """Solids in caption order, the floor's grey (0..255), the caption without a view."""

    seed: int
    solids: tuple[Solid, ...]
    floor: float
    caption: str
    views: tuple[View, ...]

    def view_caption(self, index: int) -> str:
        return view_caption(self.caption, self.views[index].azimuth)


# --- captions -----------------------------------------------------------------------------


def caption3d(items: Sequence[tuple[str, str]], joiner: str = " and ") -> str:
    """``"a red cube"``, ``"a red cube and a blue sphere"`` (or ``next to``),
    ``"a red cube, a blue sphere and a green cone"``."""
    names = [f"a {colour} {shape}" for colour, shape in items]
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return joiner.join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def view_caption(caption: str, azimuth: float) -> str:
    """The prompt of one view, as ``GensegClient.submit_views`` writes it."""
    return f"{caption}, view from {azimuth:g} degrees"


_ITEM = re.compile(r"\b(" + "|".join(PALETTE) + r")\s+(" + "|".join(SOLIDS) + r")\b")
_VIEW = re.compile(r"view from (-?\d+(?:\.\d+)?) degrees")


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], float | None]:
    """The solids a prompt names, in order (``[("red", "cube"), ...]``), and its view's
    azimuth (None without ``view from N degrees``)."""
    items = [(m.group(1), m.group(2)) for m in _ITEM.finditer(prompt.lower())]
    view = _VIEW.search(prompt.lower())
    return items, float(view.group(1)) if view else None


def held_out(items: Sequence[tuple[str, str]]) -> bool:
    """Whether the generator never sees this combination (about 1 in 8 of those with two
    or three solids; single solids are all seen): the benchmark's scenes."""
    if len(items) < 2:
        return False
    key = ";".join(f"{c} {s}" for c, s in items).encode()
    return hashlib.sha256(key).digest()[0] % 8 == 0


# --- layouts --------------------------------------------------------------------------------


def canonical_solids(items: Sequence[tuple[str, str]]) -> tuple[Solid, ...]:
    """The canonical scene of a caption's solids: the k-th on ``SLOTS[k]``."""
    if not 1 <= len(items) <= len(SLOTS):
        raise ValueError(f"a toy scene has 1 to {len(SLOTS)} solids, got {len(items)}")
    return tuple(
        Solid(colour, shape, x, z, CUBE_YAW if shape == "cube" else 0.0)
        for (colour, shape), (x, z) in zip(items, SLOTS, strict=False)
    )


def random_solids(rng: np.random.Generator, items: Sequence[tuple[str, str]]) -> tuple[Solid, ...]:
    """Solids of ``items`` anywhere in a disc of radius 1.6, apart, turned and sized at random."""
    while True:
        solids: list[Solid] = []
        for colour, shape in items:
            for _ in range(100):
                r, a = 1.6 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                s = Solid(
                    colour,
                    shape,
                    r * math.cos(a),
                    r * math.sin(a),
                    float(rng.uniform(0, 90)),
                    float(rng.uniform(0.8, 1.2)),
                )
                if all(
                    math.hypot(s.x - o.x, s.z - o.z) > s.footprint + o.footprint + 0.1
                    for o in solids
                ):
                    solids.append(s)
                    break
        if len(solids) == len(items):
            return tuple(solids)


def draw_items(rng: np.random.Generator, max_solids: int = 3) -> list[tuple[str, str]]:
    """One to ``max_solids`` solids in distinct colours, shapes at random."""
    count = int(rng.integers(1, max_solids + 1))
    colours = [list(PALETTE)[i] for i in rng.permutation(len(PALETTE))[:count]]
    return [(c, SOLIDS[int(rng.integers(len(SOLIDS)))]) for c in colours]


def make_scene3d(
    seed: int,
    *,
    layout: str = "canonical",
    views: Sequence[float] | None = None,
    size: int = 64,
    items: Sequence[tuple[str, str]] | None = None,
) -> Scene3D:
    """The scene of ``seed``: solids, floor, caption and rendered views.

    ``layout`` ``canonical`` (views: :data:`VIEWS` unless given) or ``random`` (one view
    at a random azimuth unless given). ``items`` replaces the seed's choice of solids.
    """
    rng = np.random.default_rng(seed)
    chosen = list(items) if items is not None else draw_items(rng)
    joiner = " next to " if rng.random() < 0.3 else " and "
    floor = float(rng.uniform(100, 190))
    if layout == "canonical":
        floor = CANONICAL_FLOOR
        solids = canonical_solids(chosen)
        azimuths = tuple(views) if views is not None else VIEWS
    elif layout == "random":
        solids = random_solids(rng, chosen)
        azimuths = tuple(views) if views is not None else (float(rng.uniform(0, 360)),)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    rendered = tuple(render(solids, floor, a, size=size) for a in azimuths)
    return Scene3D(seed, solids, floor, caption3d(chosen, joiner), rendered)


# --- ray casting ------------------------------------------------------------------------------


def _nearest_root(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of ``a t^2 + b t + c`` (nan where none), smaller first."""
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(np.where(disc >= 0, disc, np.nan))
        t1, t2 = (-b - root) / (2 * a), (-b + root) / (2 * a)
    return np.fmin(t1, t2), np.fmax(t1, t2)


def intersect(solid: Solid, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter of the first hit ``[N]`` (inf on a miss; units of ``dirs``) and the
    unit normal there ``[N, 3]``, for rays ``origins + t * dirs`` (``dirs`` ``[N, 3]``,
    ``origins`` ``[3]`` or ``[N, 3]``)."""
    n = len(dirs)
    r, h = solid.radius, solid.height
    yaw = math.radians(solid.yaw_deg)
    cos, sin = math.cos(yaw), math.sin(yaw)
    rot = np.array([[cos, 0.0, -sin], [0.0, 1.0, 0.0], [sin, 0.0, cos]])  # world -> local
    # the solid's frame: its foot at 0, turned back by its yaw
    o = np.broadcast_to(np.asarray(origins, np.float64) - [solid.x, 0.0, solid.z], (n, 3)) @ rot.T
    d = dirs @ rot.T
    t = np.full(n, np.inf)
    normal = np.zeros((n, 3))
    ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]

    def keep(candidate: np.ndarray, normals: np.ndarray) -> None:
        better = np.isfinite(candidate) & (candidate > 1e-6) & (candidate < t)
        t[better] = candidate[better]
        normal[better] = normals[better]

    if solid.shape == "sphere":
        cy = oy - r
        t1, _ = _nearest_root(
            (d * d).sum(1), 2 * (dx * ox + dy * cy + dz * oz), ox**2 + cy**2 + oz**2 - r * r
        )
        p = o + np.nan_to_num(t1)[:, None] * d
        keep(t1, (p - [0.0, r, 0.0]) / r)
    elif solid.shape == "cylinder":
        t1, _ = _nearest_root(dx**2 + dz**2, 2 * (dx * ox + dz * oz), ox**2 + oz**2 - r * r)
        y = oy + t1 * dy
        t1 = np.where((y >= 0) & (y <= h), t1, np.nan)
        p = o + np.nan_to_num(t1)[:, None] * d
        keep(t1, np.stack([p[:, 0] / r, np.zeros(n), p[:, 2] / r], 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            tc = (h - oy) / dy
        pc = o + np.nan_to_num(tc, posinf=0, neginf=0)[:, None] * d
        keep(
            np.where(pc[:, 0] ** 2 + pc[:, 2] ** 2 <= r * r, tc, np.nan),
            np.tile([0.0, 1, 0], (n, 1)),
        )
    elif solid.shape == "cone":
        k2, w = (r / h) ** 2, h - oy
        t1, t2 = _nearest_root(
            dx**2 + dz**2 - k2 * dy**2,
            2 * (dx * ox + dz * oz + k2 * w * dy),
            ox**2 + oz**2 - k2 * w**2,
        )
        for root in (t2, t1):  # the nearer valid one wins: keep() takes smaller t
            y = oy + root * dy
            root = np.where((y >= 0) & (y <= h), root, np.nan)
            p = o + np.nan_to_num(root)[:, None] * d
            grad = np.stack([p[:, 0], k2 * (h - p[:, 1]), p[:, 2]], 1)
            keep(root, grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12))
    elif solid.shape == "cube":
        lo, hi = np.array([-r, 0.0, -r]), np.array([r, h, r])
        safe = np.where(np.abs(d) < 1e-12, 1e-12, d)
        ta, tb = (lo - o) / safe, (hi - o) / safe
        near, far = np.minimum(ta, tb), np.maximum(ta, tb)
        axis = near.argmax(1)
        t_in, t_out = near.max(1), far.min(1)
        faces = np.zeros((n, 3))
        faces[np.arange(n), axis] = -np.sign(safe[np.arange(n), axis])
        keep(np.where(t_out >= t_in, t_in, np.nan), faces)
    else:
        raise ValueError(f"unknown solid {solid.shape!r}")
    return t, normal @ rot  # normals back to world (rot is orthonormal)


def _floor_hit(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        t = -origin[1] / dirs[:, 1]
    return np.where(dirs[:, 1] < 0, t, np.inf)


def _in_shadow(points: np.ndarray, solids: Sequence[Solid]) -> np.ndarray:
    """Whether the light is blocked from each floor point ``[N, 3]`` by a solid."""
    blocked = np.zeros(len(points), bool)
    for solid in solids:
        # only rays towards the light passing within the solid's bounding sphere can hit it
        reach = math.hypot(solid.footprint, solid.height / 2) + 1e-3
        v = solid.centre - points
        near = np.flatnonzero((v * v).sum(1) - (v @ LIGHT) ** 2 <= reach * reach)
        t, _ = intersect(solid, points[near], np.broadcast_to(LIGHT, (len(near), 3)))
        blocked[near[np.isfinite(t)]] = True
    return blocked


def render(
    solids: Sequence[Solid],
    floor: float,
    azimuth: float,
    *,
    size: int = 64,
    camera: OrbitCamera = DEFAULT_ORBIT,
) -> View:
    """Ray-cast ``solids`` on a floor of grey ``floor`` from the camera at ``azimuth``."""
    pose = camera.pose(azimuth)
    s = SUPERSAMPLE
    offsets = (np.arange(s) + 0.5) / s
    cols = (np.arange(size)[:, None] + offsets).ravel()  # sub-pixel centres, pixel units
    grid_c, grid_r = np.meshgrid(cols, cols)
    dirs = pose.directions(grid_c.ravel(), grid_r.ravel(), size, size)  # forward component 1
    t = _floor_hit(pose.position, dirs)
    owner = np.zeros(len(dirs), np.int64)  # 0 floor, k + 1 solid k
    normal = np.tile([0.0, 1.0, 0.0], (len(dirs), 1))
    unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    for k, solid in enumerate(solids):
        # only rays passing within the solid's bounding sphere can hit it
        reach = math.hypot(solid.footprint, solid.height / 2) + 1e-3
        to_centre = solid.centre - pose.position
        along = unit @ to_centre  # distance to the ray line: |v|^2 - (v . u)^2
        near = np.flatnonzero(to_centre @ to_centre - along * along <= reach * reach)
        tk, nk = intersect(solid, pose.position, dirs[near])
        nearer = tk < t[near]
        hit = near[nearer]
        t[hit], owner[hit], normal[hit] = tk[nearer], k + 1, nk[nearer]
    colours = _shade(solids, floor, pose, dirs, t, owner, normal)
    return _downsample(colours, t, owner, len(solids), size, azimuth)


def _shade(
    solids: Sequence[Solid],
    floor: float,
    pose: CameraPose,
    dirs: np.ndarray,
    t: np.ndarray,
    owner: np.ndarray,
    normal: np.ndarray,
) -> np.ndarray:
    """Colour ``[N, 3]`` (0..255) of every sample: Lambert-shaded solids, the floor grey
    where lit and darker in the solids' shadows."""
    colours = np.full((len(dirs), 3), float(floor))
    on_floor = np.flatnonzero(owner == 0)
    points = pose.position + t[on_floor, None] * dirs[on_floor]
    colours[on_floor[_in_shadow(points, solids)]] *= SHADOW
    for k, solid in enumerate(solids):
        mine = owner == k + 1
        light = AMBIENT + DIFFUSE * np.clip(normal[mine] @ LIGHT, 0.0, None)
        colours[mine] = np.asarray(PALETTE[solid.colour], np.float64) * light[:, None]
    return np.clip(colours, 0, 255)


def _downsample(
    colours: np.ndarray, t: np.ndarray, owner: np.ndarray, count: int, size: int, azimuth: float
) -> View:
    """Average the 3x3 samples of each pixel: colour, owner by majority, depth of the
    owner's samples."""
    s = SUPERSAMPLE

    def blocks(values: np.ndarray) -> np.ndarray:  # [size*s, size*s, ...] -> [size, size, s*s, ...]
        rest = values.shape[2:]
        v = values.reshape(size, s, size, s, *rest)
        return np.moveaxis(v, 2, 1).reshape(size, size, s * s, *rest)

    image = blocks(colours.reshape(size * s, size * s, 3)).mean(2)
    owners = blocks(owner.reshape(size * s, size * s))
    depth_samples = blocks(t.reshape(size * s, size * s))
    counts = np.stack([(owners == k).sum(-1) for k in range(count + 1)])  # [K+1, H, W]
    majority = counts.argmax(0)
    mine = owners == majority[..., None]
    depth = (depth_samples * mine).sum(-1) / mine.sum(-1)
    masks = counts[1:] * 2 > s * s
    return View(
        azimuth,
        np.clip(np.rint(image), 0, 255).astype(np.uint8),
        depth.astype(np.float32),
        masks,
    )


__all__ = [
    "CANONICAL_FLOOR",
    "DIMENSIONS",
    "EVAL_SEED_BASE",
    "SLOTS",
    "SOLIDS",
    "VIEWS",
    "Scene3D",
    "Solid",
    "View",
    "canonical_solids",
    "caption3d",
    "draw_items",
    "held_out",
    "intersect",
    "make_scene3d",
    "parse_prompt",
    "random_solids",
    "render",
    "view_caption",
]
