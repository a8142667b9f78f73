"""One 3D scene from its views: each object placed once, where its views agree it is.

Pure functions of the views (images, metric depth maps, object masks) and their cameras
(:mod:`scene_worker.camera`); :mod:`scene_worker.scene_mesh` reads them from the blob
store and writes the result.

Per view and object (a :class:`Sighting`): the mask's pixels (eroded by one pixel where
the object is big enough, since depth at a silhouette mixes object and background) are
unprojected with their depth into world points, the visible surface; its median point
lies in front of the object's middle, towards the camera, so the estimate of the middle
is pushed horizontally away from the camera by :data:`DEPTH_OFFSET` times the surface's
half-width across the view. An object's position is the median of its sightings'
estimates (its height: that of its visible surface's median point); its **spread** the
root mean square distance of those estimates from it.

Sightings are grouped by label (a target's name is one object); sightings labelled
:data:`GENERIC_LABEL` (automatic mode) are grouped by distance instead.

The merged ``.glb`` has one node per object, named ``object-{k}-{label}``: the
surface of its largest sighting in world coordinates (glTF +Y up, world units), moved
to the fused position, textured by that view's RGBA cut-out (alpha = mask). Its
``extras``: ``label``, ``position``, ``spread``, ``views`` (angles it was seen from).
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import trimesh
from scipy import ndimage

from plumbing.images import rgba_asset
from plumbing.mesh import MaskGrid, corner_values, cutout_material, grid_faces, textured_mesh
from scene_worker.camera import DEFAULT_ORBIT, OrbitCamera

#: How far behind its visible surface an object's middle is (horizontally, away from the
#: camera), in half-widths of that surface: calibrated on exact views of the toy world
#: (0.9 gave the smallest disagreement between views, 0.07 world units on average).
DEPTH_OFFSET = 0.9
#: The automatic mode's label: such objects are matched across views by distance.
GENERIC_LABEL = "object"
#: Sightings of generic objects closer than this (world units) are one object.
MATCH_RADIUS = 0.75
#: Grid cells along an object's long side in the merged mesh.
OBJECT_GRID = 32


@dataclass(frozen=True)
class ViewObject:
    """One segmented object of a view: its ``label`` and ``mask`` ``[H, W]`` bool."""

    label: str
    mask: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class ViewInput:
    """One view: its camera azimuth (degrees), ``image`` ``[H, W, 3]`` uint8 and metric
    ``depth`` ``[H, W]`` float (z-depth, world units), and its objects."""

    angle: float
    image: np.ndarray = field(repr=False)
    depth: np.ndarray = field(repr=False)
    objects: Sequence[ViewObject]


@dataclass(frozen=True)
class Sighting:
    """An object in one view: ``centre`` ``[3]`` the estimate of its middle (world),
    ``points`` ``[M, 3]`` its visible surface, ``mask`` ``[H, W]`` bool."""

    view: int
    label: str
    centre: np.ndarray
    points: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class MergedObject:
    """An object of the scene: fused ``position`` ``[3]``, the ``spread`` of its
    sightings' estimates around it (world units), and the sightings."""

    label: str
    position: np.ndarray
    spread: float
    sightings: tuple[Sighting, ...]


def sight(
    view: ViewInput, obj: ViewObject, index: int, camera: OrbitCamera = DEFAULT_ORBIT
) -> Sighting | None:
    """Where ``obj`` is according to ``view`` (None for an empty mask or no valid depth)."""
    height, width = obj.mask.shape
    core = ndimage.binary_erosion(obj.mask)
    mask = core if core.sum() >= 12 else obj.mask
    rows, cols = np.nonzero(mask & np.isfinite(view.depth) & (view.depth > 0))
    if len(rows) == 0:
        return None
    pose = camera.pose(view.angle)
    points = pose.unproject(cols + 0.5, rows + 0.5, view.depth[rows, cols], width, height)
    surface = np.median(points, axis=0)
    across = points @ pose.right
    half_width = (np.percentile(across, 95) - np.percentile(across, 5)) / 2
    # push back horizontally: the camera looks down, and the surface's height is the
    # same from every view, so moving along the tilted axis would only add disagreement
    away = pose.forward * np.array([1.0, 0.0, 1.0])
    centre = surface + away / np.linalg.norm(away) * DEPTH_OFFSET * half_width
    return Sighting(index, obj.label, centre, points, obj.mask)


def _groups(sightings: Sequence[Sighting]) -> list[list[Sighting]]:
    """Sightings of one object together: by label, generic ones by distance (greedily,
    at most one per view)."""
    named: dict[str, list[Sighting]] = {}
    generic: list[list[Sighting]] = []
    for s in sightings:
        if s.label != GENERIC_LABEL:
            named.setdefault(s.label, []).append(s)
            continue
        for group in generic:
            middle = np.median([g.centre for g in group], axis=0)
            if s.view not in {g.view for g in group} and (
                np.linalg.norm(s.centre - middle) <= MATCH_RADIUS
            ):
                group.append(s)
                break
        else:
            generic.append([s])
    # a label seen twice in one view: its largest sighting there stands for it
    out = []
    for group in [*named.values(), *generic]:
        best: dict[int, Sighting] = {}
        for s in group:
            if s.view not in best or s.area > best[s.view].area:
                best[s.view] = s
        out.append(sorted(best.values(), key=lambda s: s.view))
    return out


def fuse(views: Sequence[ViewInput], camera: OrbitCamera = DEFAULT_ORBIT) -> list[MergedObject]:
    """Every object of the scene once, with its fused position (ordered by label)."""
    sightings = [
        s
        for i, view in enumerate(views)
        for obj in view.objects
        if (s := sight(view, obj, i, camera)) is not None
    ]
    merged = []
    for group in _groups(sightings):
        centres = np.stack([s.centre for s in group])
        position = np.median(centres, axis=0)
        spread = float(np.sqrt(((centres - position) ** 2).sum(axis=1).mean()))
        merged.append(MergedObject(group[0].label, position, spread, tuple(group)))
    return sorted(merged, key=lambda m: (m.label, tuple(m.position)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "object"


def _object_mesh(
    view: ViewInput, mask: np.ndarray, name: str, offset: np.ndarray, camera: OrbitCamera
) -> trimesh.Trimesh | None:
    """The view's surface of ``mask`` in world coordinates, moved by ``offset``."""
    grid = MaskGrid.of(mask, OBJECT_GRID)
    if grid is None:
        return None
    height, width = mask.shape
    filled = np.where(mask, view.depth, np.median(view.depth[mask]))
    gx, gy = np.meshgrid(grid.xs, grid.ys)
    depth = corner_values(filled, grid.ys, grid.xs)
    pose = camera.pose(view.angle)
    positions = pose.unproject(gx, gy, depth, width, height).reshape(-1, 3) + offset
    material = cutout_material(name, rgba_asset(view.image, mask, grid.box))
    # grid_faces winds counter-clockwise as seen from the camera (image y down, x right)
    return textured_mesh(positions, grid.uv(), grid_faces(grid.keep), material)


def scene_glb(
    views: Sequence[ViewInput],
    merged: Sequence[MergedObject],
    camera: OrbitCamera = DEFAULT_ORBIT,
) -> bytes:
    """The merged scene's ``.glb`` (see the module docstring)."""
    scene = trimesh.Scene()
    for k, obj in enumerate(merged):
        best = max(obj.sightings, key=lambda s: s.area)
        name = f"object-{k}-{_slug(obj.label)}"
        offset = obj.position - best.centre
        mesh = _object_mesh(views[best.view], best.mask, name, offset, camera)
        if mesh is None:
            continue
        extras = {
            "label": obj.label,
            "position": [round(float(v), 4) for v in obj.position],
            "spread": round(obj.spread, 4),
            "views": [views[s.view].angle for s in obj.sightings],
        }
        scene.add_geometry(mesh, geom_name=name, node_name=name, metadata=extras)
    return scene.export(file_type="glb")


@dataclass(frozen=True)
class SceneObject:
    """An object of a merged ``.glb`` as read back: its node ``name``, ``label``,
    ``position`` ``[3]`` (world), ``spread``, and its texture's mean visible ``colour``."""

    name: str
    label: str
    position: tuple[float, float, float]
    spread: float
    colour: tuple[int, int, int]


def read_scene_objects(glb: bytes) -> list[SceneObject]:
    """The objects of a merged scene ``.glb`` (from its nodes' ``extras``, which trimesh
    does not load, and its textures)."""
    (length,) = struct.unpack("<I", glb[12:16])
    nodes = json.loads(glb[20 : 20 + length]).get("nodes", [])
    geometry = trimesh.load(io.BytesIO(glb), file_type="glb", force="scene").geometry
    objects = []
    for node in nodes:
        extras = node.get("extras") or {}
        if "position" not in extras or node.get("name") not in geometry:
            continue
        texture = np.asarray(geometry[node["name"]].visual.material.baseColorTexture)
        seen = texture[texture[..., 3] >= 128][:, :3]
        colour = tuple(int(c) for c in seen.mean(axis=0)) if len(seen) else (128, 128, 128)
        objects.append(
            SceneObject(
                node["name"],
                extras["label"],
                tuple(float(v) for v in extras["position"]),  # type: ignore[arg-type]
                float(extras["spread"]),
                colour,  # type: ignore[arg-type]
            )
        )
    return objects


__all__ = [
    "DEPTH_OFFSET",
    "GENERIC_LABEL",
    "MergedObject",
    "SceneObject",
    "Sighting",
    "ViewInput",
    "ViewObject",
    "fuse",
    "read_scene_objects",
    "scene_glb",
    "sight",
]
