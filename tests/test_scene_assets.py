"""Scene assets of one view: depth models and PNGs, the .glb export, SegStage's scene outputs.

Tiny profiles on the CPU. The tiny depth model has random weights, so its depth is
arbitrary: checks are about shapes, units, formats and agreement between outputs, and
the mesh geometry is checked against a depth map made by hand.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DepthAnythingForDepthEstimation

from consumers.stage import StageContext
from plumbing.blobstore import LocalBlobStore
from plumbing.images import encode_png
from plumbing.mesh import GLB_MEDIA_TYPE, MeshOptions, MeshPart, load_glb, view_glb
from plumbing.settings import Settings
from schemas import (
    AssetReadyEvent,
    BlobRef,
    ImageReadyEvent,
    MasksReadyEvent,
    ResolvedParams,
    SceneOptions,
    SceneViewRecord,
    Topics,
)
from seg_worker import SegStage
from seg_worker.depth import (
    ARCHS,
    DepthEstimator,
    DepthMap,
    build_depth_model,
    build_processor,
    decode_depth_png,
    depth_config,
    encode_depth_png,
    load_depth,
    median_depth,
)

torch.set_num_threads(2)

H, W = 48, 64


def noise_image(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- depth ----------------------------------------------------------------------------------


def test_tiny_depth_is_deterministic_at_the_image_size_and_leaves_the_rng_alone() -> None:
    image = noise_image()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_depth("tiny", "unused", seed=0)
    assert torch.equal(torch.rand(1), expected_next), "building the model used the caller's RNG"
    depth = first.estimate(image)
    assert depth.values.shape == (H, W) and depth.values.dtype == np.float32
    assert depth.units == "relative" and depth.scale == 1.0
    assert depth.values.min() == 0.0 and depth.values.max() == 1.0  # min-max normalised
    again = load_depth("tiny", "unused", seed=0).estimate(image)
    np.testing.assert_array_equal(again.values, depth.values)
    other_seed = load_depth("tiny", "unused", seed=1).estimate(image)
    assert not np.array_equal(other_seed.values, depth.values)


def test_relative_depth_is_inverted_disparity() -> None:
    """Depth Anything predicts disparity (larger = nearer); genseg reports 0 = nearest."""
    estimator = load_depth("tiny", "unused")
    image = noise_image(3)
    inputs = estimator.processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        disparity = estimator.model(pixel_values=inputs["pixel_values"]).predicted_depth[0]
    full = torch.nn.functional.interpolate(disparity[None, None], size=(H, W), mode="bilinear")
    disparity_px = full[0, 0].numpy()
    depth = estimator.estimate(image).values
    nearest = np.unravel_index(np.argmax(disparity_px), disparity_px.shape)
    farthest = np.unravel_index(np.argmin(disparity_px), disparity_px.shape)
    assert depth[nearest] == 0.0 and depth[farthest] == 1.0


def test_pretrained_profile_loads_a_saved_model_through_from_pretrained(tmp_path: Path) -> None:
    tiny = load_depth("tiny", "unused")
    tiny.model.save_pretrained(tmp_path / "depth")
    tiny.processor.save_pretrained(tmp_path / "depth")
    loaded = load_depth("pretrained", str(tmp_path / "depth"))
    assert type(loaded.model) is DepthAnythingForDepthEstimation
    image = noise_image(1, 40, 72)
    np.testing.assert_array_equal(loaded.estimate(image).values, tiny.estimate(image).values)
    # without a preprocessor config: Depth Anything's own preprocessing (518 px)
    tiny.model.save_pretrained(tmp_path / "bare")
    bare = load_depth("pretrained", str(tmp_path / "bare"))
    assert bare.processor.size == {"height": 518, "width": 518}
    with pytest.raises(OSError):
        load_depth("pretrained", str(tmp_path / "missing"))


def test_random_profile_is_depth_anything_v2_small() -> None:
    small = ARCHS["small"]  # Depth-Anything-V2-Small-hf's published configuration
    assert (small.hidden_size, small.layers, small.heads) == (384, 12, 6)
    assert small.out_indices == (3, 6, 9, 12)
    assert small.neck_hidden_sizes == (48, 96, 192, 384)
    assert (small.fusion_hidden_size, small.head_hidden_size, small.input_size) == (64, 32, 518)
    with torch.device("meta"):  # the parameter count, without allocating the weights
        model = DepthAnythingForDepthEstimation(depth_config("small"))
    assert sum(p.numel() for p in model.parameters()) == 24_785_089  # V2-Small: 24.8 M


def test_metric_models_report_metres_and_scale_the_png() -> None:
    config = build_depth_model("tiny").config
    config.depth_estimation_type = "metric"
    config.max_depth = 10
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DepthAnythingForDepthEstimation(config).eval()
    estimator = DepthEstimator(model, build_processor(ARCHS["tiny"].input_size))
    depth = estimator.estimate(noise_image(2))
    assert depth.units == "metres" and depth.scale == 10.0
    assert depth.values.min() >= 0.0 and depth.values.max() <= 10.0  # sigmoid * max_depth
    back = decode_depth_png(encode_depth_png(depth))
    assert back.units == "metres" and back.scale == 10.0
    np.testing.assert_allclose(back.values, depth.values, atol=10 / 65535)


def test_depth_png_format() -> None:
    values = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    png = encode_depth_png(DepthMap(values, "relative", 1.0))
    image = Image.open(io.BytesIO(png))
    assert image.mode == "I;16" and image.size == (W, H)
    assert image.info["genseg:depth_units"] == "relative"
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint16 and pixels.min() == 0 and pixels.max() == 65535
    np.testing.assert_array_equal(pixels, np.round(values * 65535))
    mask = np.zeros((H, W), bool)
    mask[10:20, 5:9] = True
    assert median_depth(DepthMap(values, "relative", 1.0), mask) == pytest.approx(
        float(np.median(values[mask])), abs=1e-6
    )
    assert median_depth(DepthMap(values, "relative", 1.0), np.zeros((H, W), bool)) is None


# --- .glb export ------------------------------------------------------------------------------


def glb_json(data: bytes) -> dict:
    """The glTF JSON chunk of a .glb (header 12 bytes, then chunk length and type)."""
    (length,) = struct.unpack("<I", data[12:16])
    assert data[16:20] == b"JSON"
    return json.loads(data[20 : 20 + length])


def pixel_of(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-corner coordinates (px, py) of vertices (x = (px - W/2)/H, y = (H/2 - py)/H)."""
    return vertices[:, 0] * H + W / 2, H / 2 - vertices[:, 1] * H


def test_glb_has_background_and_one_textured_mesh_per_object() -> None:
    image = noise_image(5)
    depth = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))  # farther to the right
    sofa = np.zeros((H, W), bool)
    sofa[8:30, 6:40] = True
    sofa[12:18, 10:20] = False  # a hole: its cells hold no triangles
    table = np.zeros((H, W), bool)
    table[34:44, 44:60] = True
    options = MeshOptions(grid=16, object_grid=64, relief=0.5, lift=0.002)
    parts = [
        MeshPart("object-0-sofa", sofa, {"label": "sofa", "depth_median": 0.3}),
        MeshPart("object-1-coffee-table", table, {"label": "coffee table"}),
    ]
    data = view_glb(image, depth, parts, options)
    assert data[:4] == b"glTF"
    scene = load_glb(data)
    assert set(scene.geometry) == {"background", "object-0-sofa", "object-1-coffee-table"}
    nodes = {n["name"]: n for n in glb_json(data)["nodes"]}
    assert nodes["object-0-sofa"]["extras"] == {"label": "sofa", "depth_median": 0.3}

    background = scene.geometry["background"]
    texture = background.visual.material.baseColorTexture
    np.testing.assert_array_equal(np.asarray(texture.convert("RGB")), image)
    px, py = pixel_of(background.vertices)
    assert (px.min(), px.max(), py.min(), py.max()) == pytest.approx((0, W, 0, H), abs=1e-4)
    np.testing.assert_allclose(background.visual.uv, np.stack([px / W, 1 - py / H], 1), atol=1e-6)
    assert len(background.faces) == 2 * 16 * 12  # 16 cells along the long side, 12 across

    for name, mask in (("object-0-sofa", sofa), ("object-1-coffee-table", table)):
        mesh = scene.geometry[name]
        material = mesh.visual.material
        assert material.alphaMode == "MASK"
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y, x, h, w = rows[0], cols[0], len(rows), len(cols)
        rgba = np.asarray(material.baseColorTexture)
        assert rgba.shape == (h, w, 4)
        crop = mask[y : y + h, x : x + w]
        np.testing.assert_array_equal(rgba[..., 3], np.where(crop, 255, 0))
        np.testing.assert_array_equal(rgba[..., :3][crop], image[y : y + h, x : x + w][crop])
        px, py = pixel_of(mesh.vertices)
        uv = mesh.visual.uv
        assert uv.shape == (len(mesh.vertices), 2)
        np.testing.assert_allclose(uv, np.stack([(px - x) / w, 1 - (py - y) / h], 1), atol=1e-6)
        # every triangle lies on cells the mask touches (object_grid >= box: one cell a pixel)
        centre_x, centre_y = pixel_of(mesh.triangles.mean(axis=1))
        assert mask[np.floor(centre_y).astype(int), np.floor(centre_x).astype(int)].all()
        assert len(mesh.faces) == 2 * int(mask.sum())
        # displaced by depth, ``lift`` in front of the background: each vertex (a pixel
        # corner) takes the mean depth of its four pixels, the object's median depth
        # standing in for pixels outside its mask (there the depth map shows the background)
        filled = np.where(mask, depth, np.median(depth[mask]))
        cx, cy = np.round(px).astype(int), np.round(py).astype(int)
        corner = sum(
            filled[np.clip(cy + dy, 0, H - 1), np.clip(cx + dx, 0, W - 1)]
            for dy in (-1, 0)
            for dx in (-1, 0)
        )
        np.testing.assert_allclose(mesh.vertices[:, 2], 0.002 - 0.5 * corner / 4, atol=1e-5)
        # the depth ramp shows: farther (more negative z) to the right
        assert np.corrcoef(px, mesh.vertices[:, 2])[0, 1] < -0.9


# --- SegStage with a scene ------------------------------------------------------------------


class SceneEnv:
    """A blob store, a tiny SegStage and image-ready events with explicit boxes."""

    def __init__(self, root: Path) -> None:
        self.store = LocalBlobStore(root / "blobs")
        self.settings = Settings(blob_url=str(self.store.root), models="tiny")
        self.stage = SegStage(self.settings)
        self.image = np.full((H, W, 3), 90, np.uint8)
        self.image[6:26, 4:34] = (200, 40, 40)
        self.image[28:44, 36:60] = (40, 200, 40)
        self.image_ref = self.store.put("gen/img.png", encode_png(Image.fromarray(self.image)), "x")

    def event(self, scene: SceneOptions | None, request_id: str = "room.view-0") -> ImageReadyEvent:
        return ImageReadyEvent(
            id=request_id,
            image=self.image_ref,
            params=ResolvedParams(
                prompt="a room",
                width=W,
                height=H,
                steps=2,
                guidance_scale=7.5,
                sampler="dpmpp_2m",
                seed=1,
            ),
            model="tiny",
            targets=["sofa", "coffee table"],
            segmentation={
                "mode": "boxes",
                "boxes": [[4, 6, 30, 20], [36, 28, 24, 16]],
                "min_confidence": 0.0,
                "smooth_px": 0,  # the tiny SAM's random masks are speckled: keep them whole
            },
            scene=scene,
        )

    def outputs(self, event: ImageReadyEvent) -> list:
        ctx = StageContext(blob=self.store, topics=Topics("t"), settings=self.settings)
        (result,) = self.stage.handle([event], ctx)
        assert isinstance(result, list), result
        return result

    def read(self, ref: BlobRef) -> bytes:
        return self.store.get(ref)


@pytest.fixture(scope="module")
def scene_env(tmp_path_factory: pytest.TempPathFactory) -> SceneEnv:
    return SceneEnv(tmp_path_factory.mktemp("scene"))


def test_scene_view_gets_depth_mesh_medians_and_a_view_record(scene_env: SceneEnv) -> None:
    scene = SceneOptions(
        scene_id="room", view="0", views_total=4, angle=0, outputs=["depth", "mesh"]
    )
    masks_out, view_out, assets_out = scene_env.outputs(scene_env.event(scene))
    masks, assets = masks_out.event, assets_out.event
    assert isinstance(masks, MasksReadyEvent) and isinstance(assets, AssetReadyEvent)
    assert sorted(a.label for a in assets.assets) == ["coffee table", "sofa"]

    # depth: a 16-bit PNG at the image's size; medians agree with it inside each mask
    assert assets.depth is not None and assets.depth.uri.endswith("/room.view-0/0/seg/depth.png")
    assert assets.depth_units == "relative"
    png = Image.open(io.BytesIO(scene_env.read(assets.depth)))
    assert png.mode == "I;16" and png.size == (W, H)
    depth = decode_depth_png(scene_env.read(assets.depth))
    for obj, item in zip(masks.objects, assets.assets, strict=True):
        mask = np.asarray(Image.open(io.BytesIO(scene_env.read(obj.mask)))) == 255
        assert item.depth_median == pytest.approx(float(np.median(depth.values[mask])), abs=2e-5)

    # mesh: background + one mesh per object, each alpha = that object's mask
    assert assets.mesh is not None and assets.mesh.media_type == GLB_MEDIA_TYPE
    glb = load_glb(scene_env.read(assets.mesh))
    names = [f"object-{k}-{a.label.replace(' ', '-')}" for k, a in enumerate(assets.assets)]
    assert set(glb.geometry) == {"background", *names}
    for name, obj in zip(names, masks.objects, strict=True):
        mesh = glb.geometry[name]
        assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices) > 0
        mask = np.asarray(Image.open(io.BytesIO(scene_env.read(obj.mask)))) == 255
        x, y, w, h = (int(v) for v in obj.bbox)
        alpha = np.asarray(mesh.visual.material.baseColorTexture)[..., 3]
        np.testing.assert_array_equal(alpha, np.where(mask[y : y + h, x : x + w], 255, 0))
    assert glb.geometry["background"].visual.uv is not None

    # the "view done" record for the scene manifest, keyed by the scene
    assert view_out.topic == "t.scene-views" and view_out.record_key == "room"
    record = view_out.event
    assert isinstance(record, SceneViewRecord)
    assert (record.scene_id, record.views_total, record.num_images) == ("room", 4, 1)
    view = record.view
    assert (view.view, view.angle, view.id, view.status) == ("0", 0.0, "room.view-0", "ok")
    assert (view.image, view.depth, view.mesh) == (assets.image, assets.depth, assets.mesh)
    assert view.objects == [a.label for a in assets.assets]
    t = assets.timings_ms
    assert t["seg.depth"] > 0 and t["seg.mesh"] > 0


def test_only_what_the_scene_asks_for(scene_env: SceneEnv) -> None:
    depth_only = SceneOptions(scene_id="r2", view="45", views_total=2, outputs=["depth"])
    _, record, assets = (o.event for o in scene_env.outputs(scene_env.event(depth_only, "r2.a")))
    assert assets.depth is not None and assets.mesh is None and record.view.mesh is None
    assert all(a.depth_median is not None for a in assets.assets)

    mesh_only = SceneOptions(scene_id="r2", view="90", views_total=2, outputs=["mesh"])
    _, _, assets = (o.event for o in scene_env.outputs(scene_env.event(mesh_only, "r2.b")))
    assert assets.depth is None and assets.mesh is not None and assets.depth_units == "relative"
    assert all(a.depth_median is not None for a in assets.assets)

    plain_view = SceneOptions(scene_id="r3", view="0", views_total=1)
    outputs = scene_env.outputs(scene_env.event(plain_view, "r3.a"))
    _, record, assets = (o.event for o in outputs)
    assert assets.depth is None and assets.mesh is None and assets.depth_units is None
    assert all(a.depth_median is None for a in assets.assets)
    assert record.scene_id == "r3", "every scene view is reported for the manifest"

    outputs = scene_env.outputs(scene_env.event(None, "no-scene"))
    assert [o.topic for o in outputs] == ["t.masks", "t.assets"]
    assert outputs[1].event.depth is None and outputs[1].event.scene is None
