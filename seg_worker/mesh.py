"""Textured 3D export of one view: a binary glTF (``.glb``) written with trimesh.

The scene holds one mesh for the background and one per segmented object, each its own
named node, so a 3D engine can pick and move the objects:

- ``background``: a grid over the whole image (``grid`` cells along the long side),
  displaced by depth, textured by the image (opaque);
- ``object-{k}-{label}``: a grid over the object's box (``object_grid`` cells along its
  long side, at most one per pixel) keeping the cells its mask touches, displaced by the
  depth inside the mask (the object's median depth where a vertex falls outside it),
  textured by the object's RGBA cut-out with ``alphaMode: MASK``: the texture's alpha is
  exactly the mask, so the silhouette is pixel-exact however coarse the grid. Its node's
  ``extras`` carry ``label``, ``score``, ``bbox`` and ``depth_median``.

Coordinates (glTF: metres by convention, +Y up, the camera looks along -Z): the image
spans ``x`` in ``[-W/2H, W/2H]`` and ``y`` in ``[-0.5, 0.5]`` (one unit = the image
height); a point at normalised depth ``d`` (0 = nearest, 1 = farthest, see
:mod:`seg_worker.depth`) sits at ``z = -relief * d``, objects ``lift`` in front of the
background so the two never z-fight. This is a relief, not a reconstruction: the
camera's intrinsics are unknown and relative depth has no scale, so depth displaces
the image plane rather than unprojecting pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trimesh
from PIL import Image
from trimesh.visual import TextureVisuals
from trimesh.visual.material import PBRMaterial

from seg_worker.finishing import mask_bbox, rgba_asset

GLB_MEDIA_TYPE = "model/gltf-binary"
BACKGROUND = "background"


@dataclass(frozen=True)
class MeshOptions:
    """Resolution and geometry of the export (lengths in units of the image height)."""

    grid: int = 64  # background cells along the image's long side
    object_grid: int = 64  # cells along an object box's long side
    relief: float = 0.5  # z of the farthest point (depth 1)
    lift: float = 0.002  # objects in front of the background by this much


@dataclass(frozen=True)
class MeshPart:
    """One object to export: a unique ``name`` and its ``mask`` ``[H, W]`` bool."""

    name: str
    mask: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)


def _axis(start: int, length: int, cells: int) -> np.ndarray:
    """Integer pixel-corner coordinates of ``cells`` (<= ``length``) cells over a span."""
    cells = max(1, min(cells, length))
    return start + np.round(np.linspace(0, length, cells + 1)).astype(np.int64)


def _cells(long_side_cells: int, w: int, h: int) -> tuple[int, int]:
    """Cells along x and y for a ``w x h`` span, ``long_side_cells`` along its longer side."""
    long_side = max(w, h)
    return (
        max(1, int(np.ceil(long_side_cells * w / long_side))),
        max(1, int(np.ceil(long_side_cells * h / long_side))),
    )


def _corner_values(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Per grid corner ``(ys[j], xs[i])``, the mean of the (up to) four pixels touching it."""
    height, width = values.shape
    rows = [np.clip(ys - 1, 0, height - 1), np.clip(ys, 0, height - 1)]
    cols = [np.clip(xs - 1, 0, width - 1), np.clip(xs, 0, width - 1)]
    return sum(values[np.ix_(r, c)] for r in rows for c in cols) / 4.0


def _grid_faces(keep: np.ndarray) -> np.ndarray:
    """Two counter-clockwise triangles (seen from +Z) per kept cell of a ``[ny, nx]`` grid."""
    nx = keep.shape[1]
    j, i = np.nonzero(keep)
    a = j * (nx + 1) + i  # top-left corner; b top-right, c bottom-left, d bottom-right
    b, c, d = a + 1, a + nx + 1, a + nx + 2
    return np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)]).astype(np.int64)


def _mesh(
    positions: np.ndarray, uv: np.ndarray, faces: np.ndarray, material: PBRMaterial
) -> trimesh.Trimesh:
    """A textured mesh of the vertices ``faces`` use (the others are dropped)."""
    used, faces = np.unique(faces, return_inverse=True)
    return trimesh.Trimesh(
        vertices=positions[used],
        faces=faces.reshape(-1, 3),
        visual=TextureVisuals(uv=uv[used], material=material),
        process=False,  # keep our vertices as they are: UVs index them one to one
    )


def _surface(
    xs: np.ndarray,
    ys: np.ndarray,
    depth: np.ndarray,
    size: tuple[int, int],
    z0: float,
    relief: float,
) -> np.ndarray:
    """Vertex positions ``[(ny+1)*(nx+1), 3]`` of the grid corners ``xs`` x ``ys``."""
    height, width = size
    gx, gy = np.meshgrid(xs, ys)
    z = z0 - relief * _corner_values(depth, ys, xs)
    return np.stack([(gx - width / 2) / height, (height / 2 - gy) / height, z], axis=-1).reshape(
        -1, 3
    )


def view_glb(
    image: np.ndarray,
    depth: np.ndarray,
    parts: Sequence[MeshPart],
    options: MeshOptions | None = None,
) -> bytes:
    """The ``.glb`` of one view.

    ``image`` ``[H, W, 3]`` uint8 RGB; ``depth`` ``[H, W]`` normalised 0..1 (0 = nearest);
    ``parts``: the objects, each becoming a mesh and node named ``part.name``.
    """
    opts = options or MeshOptions()
    height, width = depth.shape
    scene = trimesh.Scene()

    nx, ny = _cells(opts.grid, width, height)
    xs, ys = _axis(0, width, nx), _axis(0, height, ny)
    positions = _surface(xs, ys, depth, (height, width), 0.0, opts.relief)
    gx, gy = np.meshgrid(xs, ys)
    uv = np.stack([gx / width, 1.0 - gy / height], axis=-1).reshape(-1, 2)
    background = PBRMaterial(
        name=BACKGROUND,
        baseColorTexture=Image.fromarray(image, "RGB"),
        metallicFactor=0.0,
        roughnessFactor=1.0,
        doubleSided=True,
    )
    faces = _grid_faces(np.ones((len(ys) - 1, len(xs) - 1), bool))
    scene.add_geometry(
        _mesh(positions, uv, faces, background), geom_name=BACKGROUND, node_name=BACKGROUND
    )

    for part in parts:
        box = mask_bbox(part.mask)
        if box is None:
            continue
        x, y, w, h = box
        onx, ony = _cells(opts.object_grid, w, h)
        oxs, oys = _axis(x, w, onx), _axis(y, h, ony)
        # a cell is kept when any of its pixels is in the mask (integral image counts)
        counts = np.pad(part.mask, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        inside = (
            counts[np.ix_(oys[1:], oxs[1:])]
            - counts[np.ix_(oys[:-1], oxs[1:])]
            - counts[np.ix_(oys[1:], oxs[:-1])]
            + counts[np.ix_(oys[:-1], oxs[:-1])]
        )
        # outside the mask the depth map shows the background: use the object's own depth
        filled = np.where(part.mask, depth, np.median(depth[part.mask]))
        positions = _surface(oxs, oys, filled, (height, width), opts.lift, opts.relief)
        gx, gy = np.meshgrid(oxs, oys)
        uv = np.stack([(gx - x) / w, 1.0 - (gy - y) / h], axis=-1).reshape(-1, 2)
        material = PBRMaterial(
            name=part.name,
            baseColorTexture=Image.fromarray(rgba_asset(image, part.mask, box), "RGBA"),
            alphaMode="MASK",
            alphaCutoff=0.5,
            metallicFactor=0.0,
            roughnessFactor=1.0,
            doubleSided=True,
        )
        mesh = _mesh(positions, uv, _grid_faces(inside > 0), material)
        scene.add_geometry(
            mesh, geom_name=part.name, node_name=part.name, metadata=dict(part.extras)
        )
    return scene.export(file_type="glb")


def load_glb(data: bytes) -> trimesh.Scene:
    """A ``.glb`` read back with trimesh (for tests and tools)."""
    return trimesh.load(io.BytesIO(data), file_type="glb", force="scene")
