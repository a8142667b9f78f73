"""The 3D toy world renders what its cameras see: exact masks and depth (toy/world3d.py),
the cameras of scene_worker/camera.py, and captions the scene generator reads."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scene_worker.camera import DEFAULT_ORBIT
from toy.world import find_object, iou
from toy.world3d import (
    SLOTS,
    VIEWS,
    Solid,
    canonical_solids,
    held_out,
    intersect,
    make_scene3d,
    parse_prompt,
    render,
    view_caption,
)


def test_scenes_are_deterministic_and_views_differ() -> None:
    a, b = make_scene3d(3), make_scene3d(3)
    assert a.caption == b.caption and a.solids == b.solids
    for va, vb in zip(a.views, b.views, strict=True):
        assert np.array_equal(va.image, vb.image) and np.array_equal(va.depth, vb.depth)
    assert [v.azimuth for v in a.views] == list(VIEWS)
    images = [v.image for v in a.views]
    assert all(not np.array_equal(images[i], images[j]) for i in range(4) for j in range(i))


def test_the_camera_projects_and_unprojects_consistently() -> None:
    """A world point projects to the pixel whose ray at that z-depth gives it back; the
    orbit's azimuth 90 camera sits on +X, looking at the target."""
    pose = DEFAULT_ORBIT.pose(90.0)
    assert pose.position[0] > 5 and abs(pose.position[2]) < 1e-9
    point = np.array([0.3, 0.5, -0.4])
    col, row, depth = pose.project(point, 64, 64)
    assert np.allclose(pose.unproject(col, row, depth, 64, 64), point)
    target = pose.project(np.array(DEFAULT_ORBIT.target), 64, 64)
    assert np.allclose(target[:2], [32, 32]) and math.isclose(target[2], DEFAULT_ORBIT.distance)


@pytest.mark.parametrize("shape", ["cube", "sphere", "cone", "cylinder"])
def test_rays_hit_each_solid_on_its_surface(shape: str) -> None:
    """Rays from the camera hit the solid where it is: a hit point lies on the solid's
    surface (checked against its implicit equation), within its height."""
    solid = Solid("red", shape, 0.2, -0.1, yaw_deg=30.0)
    pose = DEFAULT_ORBIT.pose(45.0)
    cols, rows = np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5)
    dirs = pose.directions(cols.ravel(), rows.ravel(), 64, 64)
    t, normal = intersect(solid, pose.position, dirs)
    hit = np.isfinite(t)
    assert 50 < hit.sum() < 1500
    p = pose.position + t[hit, None] * dirs[hit] - [solid.x, 0.0, solid.z]
    r, h = solid.radius, solid.height
    assert (p[:, 1] > -1e-6).all() and (p[:, 1] < h + 1e-6).all()
    radial = np.hypot(p[:, 0], p[:, 2])
    if shape == "sphere":
        assert np.allclose(np.linalg.norm(p - [0, r, 0], axis=1), r, atol=1e-6)
    elif shape == "cylinder":
        assert (np.isclose(radial, r, atol=1e-6) | np.isclose(p[:, 1], h, atol=1e-6)).all()
    elif shape == "cone":
        assert np.allclose(radial, r / h * (h - p[:, 1]), atol=1e-6)
    else:
        yaw = math.radians(solid.yaw_deg)
        local_x = p[:, 0] * math.cos(yaw) - p[:, 2] * math.sin(yaw)
        local_z = p[:, 0] * math.sin(yaw) + p[:, 2] * math.cos(yaw)
        on_face = (
            np.isclose(np.abs(local_x), r, atol=1e-6)
            | np.isclose(np.abs(local_z), r, atol=1e-6)
            | np.isclose(p[:, 1], h, atol=1e-6)
        )
        assert on_face.all()
    assert np.allclose(np.linalg.norm(normal[hit], axis=1), 1.0)
    assert ((normal[hit] * dirs[hit]).sum(1) < 1e-9).all(), "normals face the camera"


def test_depth_is_the_z_depth_of_the_floor_and_the_solids() -> None:
    """On an empty floor, depth is the exact z-depth of y = 0; with a solid, its mask's
    pixels are nearer than the floor behind them (equal only where it stands on it)."""
    empty = render([], 150.0, 0.0)
    pose = DEFAULT_ORBIT.pose(0.0)
    row, col = 40, 20
    ray = pose.directions(np.array(col + 0.5), np.array(row + 0.5), 64, 64)
    expected = -pose.position[1] / ray[1]
    assert empty.depth[row, col] == pytest.approx(expected, rel=2e-3)
    assert np.isclose(empty.depth.std(axis=1), 0, atol=0.2).all(), "floor depth by row only"
    solid = Solid("blue", "cube", 0.0, 0.0)
    view = render([solid], 150.0, 0.0)
    nearer = empty.depth[view.masks[0]] - view.depth[view.masks[0]]
    assert (
        (nearer > -1e-3).all()
        and nearer.mean() > 0.5
        and (view.depth[~view.masks[0]] == empty.depth[~view.masks[0]]).mean() > 0.95
    )


def test_masks_are_the_solids_colours_and_match_the_colour_search() -> None:
    """The colour search of the flat world finds each visible solid's exact mask closely,
    and no colour that is not in the scene."""
    ious = []
    for seed in range(20):
        for layout in ("canonical", "random"):
            scene = make_scene3d(seed, layout=layout)
            for view in scene.views:
                for k, solid in enumerate(scene.solids):
                    if view.masks[k].sum() < 12:  # hidden behind another (random layouts)
                        continue
                    found = find_object(view.image, solid.colour)
                    assert found is not None
                    ious.append(iou(found, view.masks[k]))
                absent = {"red", "green", "blue", "yellow", "purple"}
                for colour in absent - {s.colour for s in scene.solids}:
                    assert find_object(view.image, colour) is None
    assert np.mean(ious) > 0.9 and min(ious) > 0.7


def test_canonical_scenes_keep_every_solid_in_view_and_unhidden() -> None:
    """The slots keep all three solids inside every view and at least 90 % visible."""
    for shape in ("cube", "cone", "cylinder", "sphere"):
        items = [("red", shape), ("green", shape), ("blue", shape)]
        solids = canonical_solids(items)
        assert [(s.x, s.z) for s in solids] == list(SLOTS)
        for azimuth in VIEWS:
            view = render(solids, 150.0, azimuth)
            for k, solid in enumerate(solids):
                alone = render([solid], 150.0, azimuth).masks[0]
                ys, xs = np.nonzero(alone)
                assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63
                assert view.masks[k].sum() >= 0.9 * alone.sum(), (shape, azimuth, k)


def test_captions_name_the_solids_and_the_view() -> None:
    scene = make_scene3d(5)
    prompt = scene.view_caption(1)
    assert prompt == view_caption(scene.caption, 45.0) == f"{scene.caption}, view from 45 degrees"
    items, azimuth = parse_prompt(prompt)
    assert items == [(s.colour, s.shape) for s in scene.solids] and azimuth == 45.0
    assert parse_prompt("a red cube next to a blue sphere") == (
        [("red", "cube"), ("blue", "sphere")],
        None,
    )


def test_held_out_combinations_are_a_stable_minority() -> None:
    """About one pair in eight is kept for the benchmark; single solids never are."""
    colours = ("red", "green", "blue", "yellow", "purple")
    shapes = ("cube", "sphere", "cone", "cylinder")
    pairs = [
        [(a, s), (b, t)] for a in colours for b in colours if a != b for s in shapes for t in shapes
    ]
    assert not any(held_out([(c, s)]) for c in colours for s in shapes)
    assert held_out(pairs[0]) == held_out(list(pairs[0]))
    share = np.mean([held_out(p) for p in pairs])
    assert 0.08 < share < 0.18
