"""SegStage.handle on hand-made images and heat maps in a local blob store (tiny SAM, CPU).

The tiny model has random weights: its masks are arbitrary and its predicted IoUs
small. Tests that depend on scores fix them by setting the IoU head's last layer
(weights 0, bias = the wanted scores), which is a change of model weights, not of
our code.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from consumers.stage import PermanentError, StageContext
from plumbing.blobstore import BlobIntegrityError, ForeignBlobRef, LocalBlobStore
from plumbing.images import InvalidImage, encode_heatmap, encode_png
from plumbing.settings import Settings
from schemas import (
    AssetReadyEvent,
    BlobRef,
    ImageReadyEvent,
    MasksReadyEvent,
    ResolvedParams,
    SceneOptions,
    SegmentationOptions,
    Topics,
)
from seg_worker import SegStage
from seg_worker.finishing import decode_rle

torch.set_num_threads(2)

H, W = 128, 160


def make_image() -> np.ndarray:
    image = np.full((H, W, 3), 90, np.uint8)
    image[16:48, 24:56] = (200, 40, 40)  # "cup", top-left
    image[80:104, 112:144] = (40, 200, 40)  # "plate", bottom-right
    image[60:70, 60:70] = (40, 40, 220)  # "spoon", centre
    return image


def blob_heat(y: slice, x: slice, value: float = 1.0) -> np.ndarray:
    heat = np.zeros((H // 8, W // 8), np.float32)  # latent resolution
    heat[y, x] = value
    return heat


HEATS = {
    "cup": blob_heat(slice(2, 6), slice(3, 7)),
    "plate": blob_heat(slice(10, 13), slice(14, 18)),
    "spoon": blob_heat(slice(7, 9), slice(7, 9)),
}


class Env:
    """A blob store, settings, a stage and a context, as the runtime would make them."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.store = LocalBlobStore(root / "blobs")
        self.settings = Settings(blob_url=str(self.store.root), models="tiny", **settings)
        self.stage = SegStage(self.settings)
        self.image = make_image()
        self.image_ref = self.store.put(
            "gen/img.png", encode_png(Image.fromarray(self.image)), "image/png"
        )

    def ctx(self) -> StageContext:
        return StageContext(blob=self.store, topics=Topics("t"), settings=self.settings)

    def event(
        self,
        targets: list[str] | None = None,
        *,
        image: BlobRef | None = None,
        missing: list[str] | None = None,
        crop: bool = True,
        request_id: str = "req-1",
        **seg: object,
    ) -> ImageReadyEvent:
        targets = ["cup", "plate"] if targets is None else targets
        heatmaps = {
            t: self.store.put(f"gen/heat-{t}.png", encode_heatmap(HEATS[t]), "image/png")
            for t in targets
            if t not in (missing or [])
        }
        options = {"min_confidence": 0.0, "smooth_px": 1, **seg}
        return ImageReadyEvent.model_validate(
            {
                "id": request_id,
                "image": image or self.image_ref,
                "params": ResolvedParams(
                    prompt="a cup and a plate",
                    width=W,
                    height=H,
                    steps=2,
                    guidance_scale=7.5,
                    sampler="dpmpp_2m",
                    seed=1,
                ),
                "model": "tiny",
                "heatmaps": heatmaps,
                "targets": targets,
                "missing_targets": missing or [],
                "segmentation": SegmentationOptions(**options),  # type: ignore[arg-type]
                "asset": {"crop": crop},
                "timings_ms": {"denoise": 12.5, "gen.vae_decode": 3.0},
            }
        )

    def handle(self, *events: ImageReadyEvent) -> list:
        return self.stage.handle(list(events), self.ctx())

    def ok(self, event: ImageReadyEvent) -> tuple[MasksReadyEvent, AssetReadyEvent]:
        (result,) = self.handle(event)
        assert isinstance(result, list), result
        masks, assets = result
        assert (masks.topic, assets.topic) == ("t.masks", "t.assets")
        assert isinstance(masks.event, MasksReadyEvent)
        assert isinstance(assets.event, AssetReadyEvent)
        return masks.event, assets.event

    def fix_scores(self, scores: list[float]) -> None:
        """Make SAM predict these IoUs for its three multimask outputs, whatever the input."""
        head = self.stage.predictor.model.mask_decoder.iou_prediction_head.layers[-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, *scores]))

    def png(self, ref: BlobRef) -> Image.Image:
        return Image.open(io.BytesIO(self.store.get(ref)))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_masks_and_assets_for_two_targets(env: Env) -> None:
    masks, assets = env.ok(env.event(["cup", "plate"]))
    assert masks.id == assets.id == "req-1" and masks.image == assets.image == env.image_ref
    assert assets.status == "ok" and len(assets.assets) == len(masks.objects) >= 2
    assert {o.label for o in masks.objects} == {"cup", "plate"}
    scores = [o.score for o in masks.objects]
    assert scores == sorted(scores, reverse=True)
    assert assets.masks == [o.mask for o in masks.objects]
    for k, (obj, item) in enumerate(zip(masks.objects, assets.assets, strict=True)):
        assert obj.mask.uri.endswith(f"/req-1/0/seg/mask-{k}.png")
        assert item.asset.uri.endswith(f"/req-1/0/seg/asset-{k}.png")
        assert (item.label, item.score, item.bbox) == (obj.label, obj.score, obj.bbox)
        mask_image = env.png(obj.mask)
        assert mask_image.mode == "L" and mask_image.size == (W, H)
        mask = np.asarray(mask_image)
        assert set(np.unique(mask)) <= {0, 255}
        mask = mask == 255
        np.testing.assert_array_equal(decode_rle(obj.rle.model_dump()), mask)
        assert obj.rle.size == [H, W] and obj.area == int(mask.sum()) > 0
        x, y, w, h = (int(v) for v in obj.bbox)
        assert all(float(v).is_integer() for v in obj.bbox)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (x, y, x + w - 1, y + h - 1) == (cols[0], rows[0], cols[-1], rows[-1])
        rgba = np.asarray(env.png(item.asset))
        assert rgba.shape == (h, w, 4)  # cropped to the object's box
        crop_mask = mask[y : y + h, x : x + w]
        np.testing.assert_array_equal(rgba[..., 3], np.where(crop_mask, 255, 0))
        np.testing.assert_array_equal(
            rgba[crop_mask, :3], env.image[y : y + h, x : x + w][crop_mask]
        )
        assert not rgba[~crop_mask].any()  # transparent (and black) outside
    t = assets.timings_ms
    assert t["gen.denoise"] == 12.5 and t["gen.vae_decode"] == 3.0
    for phase in ("decode_image", "prompts", "embed", "predict", "assets", "blob_write"):
        assert t[f"seg.{phase}"] >= 0 and masks.timings_ms[f"seg.{phase}"] == t[f"seg.{phase}"]


def test_full_canvas_asset_when_crop_is_off(env: Env) -> None:
    masks, assets = env.ok(env.event(["cup"], crop=False))
    obj, item = masks.objects[0], assets.assets[0]
    rgba = np.asarray(env.png(item.asset))
    assert rgba.shape == (H, W, 4)
    mask = np.asarray(env.png(obj.mask)) == 255
    np.testing.assert_array_equal(rgba[..., 3] == 255, mask)
    assert not rgba[~mask].any()


def test_encoder_runs_once_for_three_targets_and_again_never(env: Env) -> None:
    calls: list[tuple[int, ...]] = []
    encoder = env.stage.predictor.model.image_encoder
    encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(tuple(inputs[0].shape)))
    masks, _ = env.ok(env.event(["cup", "plate", "spoon"]))
    assert {o.label for o in masks.objects} == {"cup", "plate", "spoon"}
    assert calls == [(1, 3, 256, 256)]
    env.ok(env.event(["plate"], request_id="req-2"))  # another request, same image
    assert len(calls) == 1 and env.stage.predictor.cache.hits >= 1


def test_a_batch_of_images_shares_one_encoder_pass(env: Env) -> None:
    other = make_image()[:, ::-1].copy()
    other_ref = env.store.put("gen/other.png", encode_png(Image.fromarray(other)), "image/png")
    results = env.handle(env.event(["cup"]), env.event(["cup"], image=other_ref, request_id="b"))
    assert all(isinstance(r, list) for r in results)
    assert env.stage.predictor.encoder_images == 2 and env.stage.predictor.encoder_batches == 1


def test_pyramid_returns_full_size_masks(env: Env) -> None:
    masks, assets = env.ok(env.event(["cup", "plate"], scales=[0.5, 0.75, 1.0]))
    assert env.stage.predictor.encoder_images == 3  # one per scale, shared by both targets
    assert assets.status == "ok"
    for obj in masks.objects:
        assert obj.rle.size == [H, W] and env.png(obj.mask).size == (W, H)


def test_max_objects_and_min_confidence(env: Env) -> None:
    env.fix_scores([0.5, 0.9, 0.7])  # the best multimask output scores 0.9
    masks, assets = env.ok(env.event(["cup", "plate", "spoon"], max_objects=2, min_confidence=0.85))
    assert len(masks.objects) == len(assets.assets) == 2
    assert all(abs(o.score - 0.9) < 1e-6 for o in masks.objects)
    masks, assets = env.ok(env.event(["cup", "plate", "spoon"], min_confidence=0.95))
    assert masks.objects == [] and assets.status == "no_match"


def test_no_match_is_still_a_terminal_asset_event(env: Env) -> None:
    env.fix_scores([0.1, 0.2, 0.3])
    masks, assets = env.ok(env.event(["cup"], min_confidence=0.8))
    assert assets.status == "no_match" and assets.assets == [] and assets.masks == []
    assert masks.objects == [] and assets.image == env.image_ref
    assert "seg.predict" in assets.timings_ms


def test_a_target_that_yields_nothing_is_retried_on_a_crop_around_its_peak(env: Env) -> None:
    env.fix_scores([0.1, 0.2, 0.3])
    env.ok(env.event(["spoon"], min_confidence=0.8))
    crops = [key[2] for key in env.stage.predictor.cache._items if key[2] is not None]
    assert len(crops) == 1 and env.stage.predictor.encoder_images == 2
    x0, y0, x1, y1 = crops[0]
    assert x0 <= 64 < x1 and y0 <= 64 < y1  # the spoon's heat peak is at (56..72, 56..72)
    assert (x1 - x0) < W and (y1 - y0) < H  # a zoom, not the whole image
    env.fix_scores([0.9, 0.2, 0.3])
    env.ok(env.event(["spoon"], min_confidence=0.8, request_id="req-2"))
    assert env.stage.predictor.encoder_images == 2  # passed first time: no new crop


def test_missing_target_falls_back_to_automatic_mode(env: Env) -> None:
    masks, _ = env.ok(env.event(["cup", "ghost"], missing=["ghost"]))
    labels = [o.label for o in masks.objects]
    assert "cup" in labels and "ghost" in labels
    assert env.stage.predictor.encoder_images == 1  # the automatic pass reuses the embedding


def test_boxes_and_points_modes(env: Env) -> None:
    masks, _ = env.ok(env.event(["cup"], mode="boxes", boxes=[[24, 16, 32, 32], [112, 80, 32, 24]]))
    assert sorted(o.label for o in masks.objects) == ["box-1", "cup"]
    masks, _ = env.ok(
        env.event(
            [],
            mode="points",
            points=[{"x": 40, "y": 30}, {"x": 5, "y": 5, "label": 0}, {"x": 128, "y": 92}],
        )
    )
    assert sorted(o.label for o in masks.objects) == ["point-0", "point-1"]
    masks, _ = env.ok(env.event([], mode="auto"))
    assert all(o.label == "object" for o in masks.objects) and masks.objects


def test_bad_references_are_permanent_errors(env: Env, tmp_path: Path) -> None:
    good = env.image_ref
    foreign = good.model_copy(update={"uri": (tmp_path / "elsewhere.png").as_uri()})
    tampered = good.model_copy(update={"sha256": "0" * 64})
    results = env.handle(
        env.event(["cup"], image=foreign, request_id="a"),
        env.event(["cup"], image=tampered, request_id="b"),
        env.event(["cup"], request_id="c"),
    )
    # Each blob error is classified once, by its class (plumbing.errors).
    assert isinstance(results[0], ForeignBlobRef) and isinstance(results[0], PermanentError)
    assert results[0].error_type == "foreign_blob_ref"
    assert isinstance(results[1], BlobIntegrityError) and isinstance(results[1], PermanentError)
    assert isinstance(results[2], list)  # the good one in the same batch still completes


def test_truncated_and_oversized_images_are_refused(tmp_path: Path) -> None:
    env = Env(tmp_path, max_image_pixels=100 * 100)
    big = env.store.put("gen/big.png", encode_png(Image.fromarray(make_image())), "image/png")
    data = encode_png(Image.fromarray(make_image()[:64, :64]))
    truncated = env.store.put("gen/trunc.png", data[: len(data) // 2], "image/png")
    results = env.handle(
        env.event(["cup"], image=big, request_id="a"),
        env.event(["cup"], image=truncated, request_id="b"),
    )
    assert isinstance(results[0], InvalidImage) and "exceeds" in str(results[0])
    assert isinstance(results[1], InvalidImage) and isinstance(results[1], PermanentError)


def test_tenant_and_scene_are_carried_to_the_terminal_event(env: Env) -> None:
    scene = SceneOptions(scene_id="room", view="0", views_total=4, angle=0.0)
    event = env.event(["cup"]).model_copy(update={"tenant": "acme", "scene": scene})
    (result,) = env.handle(event)
    masks, view_done, assets = (out.event for out in result)  # + the scene's "view done"
    assert masks.tenant == assets.tenant == view_done.tenant == "acme"
    assert assets.scene == scene
    assert result[1].topic == "t.scene-views" and result[1].record_key == "room"
    # the terminal outcome comes last, marked so the runtime sends it after the others
    assert [out.terminal for out in result] == [False, False, True]
