"""The merged scene .glb (scene_worker/merge.py, scene_mesh.py): each object once, where
its views agree it is, textured; written by the scene stage with the scene-ready event.

Views are the 3D toy world's exact renders (toy/world3d.py), whose cameras are the
stage's (scene_worker/camera.py), so the true positions are known."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consumers.stage import StageContext
from consumers.topic_log import KafkaTopicLog
from plumbing.blobstore import BlobStore, blob_key, scene_key
from plumbing.images import encode_png
from plumbing.kafka import ensure_topics
from plumbing.mesh import load_glb
from plumbing.settings import Settings
from scene_worker.merge import ViewInput, ViewObject, fuse, read_scene_objects, scene_glb
from scene_worker.scene_mesh import merged_glb, read_metric_depth
from scene_worker.stage import SceneStage
from schemas import SceneReadyEvent, SceneView, SceneViewRecord
from seg_worker.depth import DepthMap, encode_depth_png
from seg_worker.finishing import mask_png
from toy.world import PALETTE
from toy.world3d import Scene3D, make_scene3d


def inputs(scene: Scene3D, *, labels: list[str] | None = None) -> list[ViewInput]:
    names = labels or [s.name for s in scene.solids]
    return [
        ViewInput(
            v.azimuth,
            v.image,
            v.depth,
            [ViewObject(n, m) for n, m in zip(names, v.masks, strict=True)],
        )
        for v in scene.views
    ]


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_fused_positions_agree_with_the_world(seed: int) -> None:
    """From exact views, every solid is placed once, within 0.2 world units of its true
    middle (horizontally), its views agreeing within 0.15."""
    scene = make_scene3d(seed)
    merged = fuse(inputs(scene))
    assert sorted(m.label for m in merged) == sorted(s.name for s in scene.solids)
    for obj in merged:
        solid = next(s for s in scene.solids if s.name == obj.label)
        assert len(obj.sightings) == 4
        error = np.linalg.norm((obj.position - solid.centre)[[0, 2]])
        assert error < 0.2, (obj.label, error)
        assert obj.spread < 0.15, (obj.label, obj.spread)


def test_a_view_that_disagrees_does_not_move_the_object_far() -> None:
    """One view's object in the wrong place (a bad segmentation) moves the median little,
    and shows in the spread."""
    scene = make_scene3d(2)
    views = inputs(scene)
    good = fuse(views)
    first = views[0].objects[0]
    views[0] = ViewInput(
        views[0].angle,
        views[0].image,
        views[0].depth,
        [ViewObject(first.label, np.roll(first.mask, 12, axis=1)), *views[0].objects[1:]],
    )
    bad = fuse(views)
    a = next(m for m in good if m.label == first.label)
    b = next(m for m in bad if m.label == first.label)
    assert np.linalg.norm(a.position - b.position) < 0.4
    assert b.spread > a.spread + 0.1


def test_generic_objects_are_matched_by_distance() -> None:
    """Automatic-mode objects (all labelled "object") become one per solid."""
    scene = make_scene3d(7)
    merged = fuse(inputs(scene, labels=["object"] * len(scene.solids)))
    assert len(merged) == len(scene.solids)
    assert all(len(m.sightings) == 4 for m in merged)


def test_the_merged_glb_has_each_object_once_textured_at_its_position() -> None:
    scene = make_scene3d(1)
    views = inputs(scene)
    merged = fuse(views)
    data = scene_glb(views, merged)
    loaded = load_glb(data)
    names = [f"object-{k}-{m.label.replace(' ', '-')}" for k, m in enumerate(merged)]
    assert sorted(loaded.geometry) == sorted(names)
    read = {o.name: o for o in read_scene_objects(data)}
    assert sorted(read) == sorted(names)
    for name, obj in zip(names, merged, strict=True):
        back = read[name]
        assert back.label == obj.label and np.allclose(back.position, obj.position, atol=1e-4)
        mesh = loaded.geometry[name]
        # the surface sits around the fused position (world units, +Y up, on the floor)
        middle = mesh.vertices.mean(axis=0)
        assert np.linalg.norm((middle - obj.position)[[0, 2]]) < 0.5
        assert mesh.vertices[:, 1].min() > -0.1
        texture = np.asarray(mesh.visual.material.baseColorTexture)
        assert texture.shape[2] == 4 and (texture[..., 3] == 255).any()
        solid = next(s for s in scene.solids if s.name == obj.label)
        assert np.argmax(back.colour) == np.argmax(PALETTE[solid.colour])


def write_view(blob: BlobStore, scene: Scene3D, i: int, scene_id: str) -> SceneViewRecord:
    """What the seg worker leaves for one view: image, metric depth PNG, mask PNGs, and
    its "view done" record."""
    view = scene.views[i]
    request = f"{scene_id}.view-{view.azimuth:g}"
    png = encode_png(Image.fromarray(view.image))
    image = blob.put(blob_key(request, 0, "gen", "image.png"), png, "image/png")
    depth_png = encode_depth_png(DepthMap(view.depth, "metres", 20.0))
    depth = blob.put(blob_key(request, 0, "seg", "depth.png"), depth_png, "image/png")
    for k, mask in enumerate(view.masks):
        blob.put(blob_key(request, 0, "seg", f"mask-{k}.png"), mask_png(mask), "image/png")
    return SceneViewRecord(
        scene_id=scene_id,
        views_total=len(scene.views),
        view=SceneView(
            view=f"{view.azimuth:g}",
            angle=view.azimuth,
            id=request,
            status="ok",
            image=image,
            depth=depth,
            objects=[s.name for s in scene.solids],
        ),
    )


def test_depth_pngs_are_read_in_metres_and_relative_ones_refused() -> None:
    depth = np.linspace(3.0, 15.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    metres = read_metric_depth(encode_depth_png(DepthMap(depth, "metres", 20.0)))
    assert metres is not None and np.abs(metres - depth).max() < 20 / 65535
    assert read_metric_depth(encode_depth_png(DepthMap(depth / 20, "relative", 1.0))) is None


def test_merged_glb_from_the_blob_store(tmp_path: Path) -> None:
    blob = BlobStore.from_url(str(tmp_path))
    scene = make_scene3d(4)
    records = [write_view(blob, scene, i, "s1") for i in range(4)]
    data = merged_glb(blob, records)
    assert data is not None
    labels = sorted(o.label for o in read_scene_objects(data))
    assert labels == sorted(s.name for s in scene.solids)


def test_the_scene_stage_writes_the_merged_glb_with_the_event(settings: Settings) -> None:
    asyncio.run(ensure_topics(settings, partitions=1))
    blob = BlobStore.from_url(settings.blob_url)
    scene = make_scene3d(6)
    ctx = StageContext(
        blob=blob, topics=settings.topics, settings=settings, topic_log=KafkaTopicLog(settings)
    )
    stage = SceneStage(settings)
    outputs = []
    for i in range(4):
        [result] = stage.handle([write_view(blob, scene, i, "room-9")], ctx)
        assert isinstance(result, list)
        outputs += result
    [output] = outputs
    assert isinstance(output.event, SceneReadyEvent)
    data = blob.get_key(scene_key("room-9", "scene.glb"), max_bytes=1 << 24)
    assert sorted(o.label for o in read_scene_objects(data)) == sorted(s.name for s in scene.solids)
    mesh = getattr(output.event, "mesh", None)  # the contract field, once it exists
    if "mesh" in SceneReadyEvent.model_fields:
        assert mesh is not None and mesh.uri.endswith("_scenes/room-9/scene.glb")
