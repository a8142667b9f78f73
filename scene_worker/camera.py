"""The orbit camera of multi-view scenes: where a view's camera is, from its angle.

A scene view's angle (``scene.angle``, degrees) is the camera's **azimuth** on a circle
around the scene; elevation, distance, field of view and the point looked at are fixed
per deployment (:class:`OrbitCamera`). :data:`DEFAULT_ORBIT` is the toy world's
(toy/world3d.py renders with it), so the toy's views are exactly these cameras.

Conventions (right-handed, glTF's): world ``+Y`` up, the floor is ``y = 0``, lengths in
world units (the toy world calls them metres). A camera at azimuth ``a`` and elevation
``e`` sits at ``target + distance * (cos e sin a, sin e, cos e cos a)``: azimuth 0 looks
from ``+Z`` towards ``-Z``, azimuth 90 from ``+X``. It looks at ``target``, no roll.

Pinhole, square pixels, the principal point at the image centre; pixel ``(col, row)``
covers ``[col, col + 1) x [row, row + 1)``, rows going down. **Depth is z-depth**: the
distance along the camera's optical axis (what a depth map holds), not along the ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CameraPose:
    """One camera: ``position`` ``[3]``, and its ``right``, ``up`` and ``forward`` unit
    axes ``[3]`` in world coordinates; ``focal``: focal length in units of the image
    height (``0.5 / tan(fov / 2)``)."""

    position: np.ndarray
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray
    focal: float

    def directions(self, cols: np.ndarray, rows: np.ndarray, width: int, height: int) -> np.ndarray:
        """Un-normalised ray directions ``[..., 3]`` through image points ``(cols, rows)``
        (pixel units, continuous), scaled so their ``forward`` component is 1: a point at
        z-depth ``d`` along one is ``position + d * direction``."""
        f = self.focal * height
        x = (np.asarray(cols, np.float64) - width / 2) / f
        y = (height / 2 - np.asarray(rows, np.float64)) / f
        return self.forward + x[..., None] * self.right + y[..., None] * self.up

    def unproject(
        self, cols: np.ndarray, rows: np.ndarray, depth: np.ndarray, width: int, height: int
    ) -> np.ndarray:
        """World points ``[..., 3]`` of image points ``(cols, rows)`` at z-depth ``depth``."""
        dirs = self.directions(cols, rows, width, height)
        return self.position + np.asarray(depth, np.float64)[..., None] * dirs

    def project(self, points: np.ndarray, width: int, height: int) -> np.ndarray:
        """Image coordinates and z-depth ``[..., 3]`` (col, row, depth) of world ``points``."""
        rel = np.asarray(points, np.float64) - self.position
        depth = rel @ self.forward
        f = self.focal * height
        cols = width / 2 + f * (rel @ self.right) / depth
        rows = height / 2 - f * (rel @ self.up) / depth
        return np.stack([cols, rows, depth], axis=-1)


@dataclass(frozen=True)
class OrbitCamera:
    """The cameras of a scene's views: azimuth from the view's angle, the rest fixed.

    ``elevation_deg`` above the horizon, ``distance`` from ``target`` (world units),
    ``fov_deg`` the vertical field of view.
    """

    elevation_deg: float = 30.0
    distance: float = 7.0
    fov_deg: float = 35.0
    target: tuple[float, float, float] = (0.0, 0.4, 0.0)

    def pose(self, azimuth_deg: float) -> CameraPose:
        """The camera of the view at ``azimuth_deg``."""
        a, e = math.radians(azimuth_deg), math.radians(self.elevation_deg)
        target = np.asarray(self.target, np.float64)
        offset = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
        position = target + self.distance * offset
        forward = -offset
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        focal = 0.5 / math.tan(math.radians(self.fov_deg) / 2)
        return CameraPose(position, right, up, forward, focal)


#: The toy world's orbit (toy/world3d.py): 30 degrees above the floor, 7 units from a
#: point 0.4 above the scene's centre, 35 degrees of vertical field of view.
DEFAULT_ORBIT = OrbitCamera()

__all__ = ["DEFAULT_ORBIT", "CameraPose", "OrbitCamera"]
