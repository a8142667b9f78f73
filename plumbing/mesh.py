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

from plumbing.images import mask_bbox, rgba_asset

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


def grid_axis(start: int, length: int, cells: int) -> np.ndarray:
    """Integer pixel-corner coordinates of ``cells`` (<= ``length``) cells over a span."""
    cells = max(1, min(cells, length))
    return start + np.round(np.linspace(0, length, cells + 1)).astype(np.int64)


def grid_cells(long_side_cells: int, w: int, h: int) -> tuple[int, int]:
    """Cells along x and y for a ``w x h`` span, ``long_side_cells`` along its longer side."""
    long_side = max(w, h)
    return (
        max(1, int(np.ceil(long_side_cells * w / long_side))),
        max(1, int(np.ceil(long_side_cells * h / long_side))),
    )


def corner_values(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Per grid corner ``(ys[j], xs[i])``, the mean of the (up to) four pixels touching it."""
    height, width = values.shape
    rows = [np.clip(ys - 1, 0, height - 1), np.clip(ys, 0, height - 1)]
    cols = [np.clip(xs - 1, 0, width - 1), np.clip(xs, 0, width - 1)]
    return sum(values[np.ix_(r, c)] for r in rows for c in cols) / 4.0


def grid_faces(keep: np.ndarray) -> np.ndarray:
    """Two counter-clockwise triangles (seen from +Z) per kept cell of a ``[ny, nx]`` grid."""
    nx = keep.shape[1]
    j, i = np.nonzero(keep)
    a = j * (nx + 1) + i  # top-left corner; b top-right, c bottom-left, d bottom-right
    b, c, d = a + 1, a + nx + 1, a + nx + 2
    return np.concatenate([np.stack([a, c, d], 1), np.stack([a, d, b], 1)]).astype(np.int64)


def textured_mesh(
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


@dataclass(frozen=True)
class MaskGrid:
    """A grid over a mask's box: corner pixel coordinates ``xs`` ``[nx+1]`` and ``ys``
    ``[ny+1]``, and ``keep`` ``[ny, nx]``, the cells any pixel of the mask falls in."""

    box: tuple[int, int, int, int]  # x, y, w, h (pixels)
    xs: np.ndarray
    ys: np.ndarray
    keep: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray, long_side_cells: int) -> MaskGrid | None:
        """The grid of ``mask`` ``[H, W]`` bool (``long_side_cells`` cells along its box's
        long side, at most one per pixel); None for an empty mask."""
        box = mask_bbox(mask)
        if box is None:
            return None
        x, y, w, h = box
        nx, ny = grid_cells(long_side_cells, w, h)
        xs, ys = grid_axis(x, w, nx), grid_axis(y, h, ny)
        # a cell is kept when any of its pixels is in the mask (integral image counts)
        counts = np.pad(mask, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        inside = (
            counts[np.ix_(ys[1:], xs[1:])]
            - counts[np.ix_(ys[:-1], xs[1:])]
            - counts[np.ix_(ys[1:], xs[:-1])]
            + counts[np.ix_(ys[:-1], xs[:-1])]
        )
        return cls(box, xs, ys, inside > 0)

    def uv(self) -> np.ndarray:
        """Texture coordinates ``[(ny+1)*(nx+1), 2]`` of the corners in the box's cut-out."""
        x, y, w, h = self.box
        gx, gy = np.meshgrid(self.xs, self.ys)
        return np.stack([(gx - x) / w, 1.0 - (gy - y) / h], axis=-1).reshape(-1, 2)


def cutout_material(name: str, rgba: np.ndarray) -> PBRMaterial:
    """An unlit-looking material textured by an RGBA cut-out ``[h, w, 4]`` whose alpha is
    the mask (``alphaMode: MASK``), double-sided."""
    return PBRMaterial(
        name=name,
        baseColorTexture=Image.fromarray(rgba, "RGBA"),
        alphaMode="MASK",
        alphaCutoff=0.5,
        metallicFactor=0.0,
        roughnessFactor=1.0,
        doubleSided=True,
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
    z = z0 - relief * corner_values(depth, ys, xs)
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

    nx, ny = grid_cells(opts.grid, width, height)
    xs, ys = grid_axis(0, width, nx), grid_axis(0, height, ny)
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
    faces = grid_faces(np.ones((len(ys) - 1, len(xs) - 1), bool))
    scene.add_geometry(
        textured_mesh(positions, uv, faces, background), geom_name=BACKGROUND, node_name=BACKGROUND
    )

    for part in parts:
        grid = MaskGrid.of(part.mask, opts.object_grid)
        if grid is None:
            continue
        # outside the mask the depth map shows the background: use the object's own depth
        filled = np.where(part.mask, depth, np.median(depth[part.mask]))
        positions = _surface(grid.xs, grid.ys, filled, (height, width), opts.lift, opts.relief)
        material = cutout_material(part.name, rgba_asset(image, part.mask, grid.box))
        mesh = textured_mesh(positions, grid.uv(), grid_faces(grid.keep), material)
        scene.add_geometry(
            mesh, geom_name=part.name, node_name=part.name, metadata=dict(part.extras)
        )
    return scene.export(file_type="glb")


def load_glb(data: bytes) -> trimesh.Scene:
    """A ``.glb`` read back with trimesh (for tests and tools)."""
    return trimesh.load(io.BytesIO(data), file_type="glb", force="scene")
