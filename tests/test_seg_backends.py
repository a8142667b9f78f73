"""Segmenter backends (GENSEG_SEGMENTER): segment-anything, SAM 2.1 and the seam between them.

SAM 2.1 is transformers' ``Sam2Model`` in the tiny configuration built in code, saved
with ``save_pretrained`` and loaded back through the ``pretrained`` profile, as a
worker loads a real checkpoint. Random weights give arbitrary masks: the tests check
structure, scores, counts, caching and determinism, not quality. Scores are fixed, where
a test needs them, by setting the IoU head's last layer (a change of model weights).
SAM 3 and the concept modes are in tests/test_seg_concept.py.
"""

from __future__ import annotations

import asyncio
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Sam2Model

from consumers.stage import PermanentError, StageContext
from plumbing.blobstore import BlobStore, LocalBlobStore
from plumbing.images import encode_heatmap, encode_png
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import (
    AssetReadyEvent,
    BlobRef,
    ImageReadyEvent,
    MasksReadyEvent,
    PromptEvent,
    ResolvedParams,
    SegmentationOptions,
    Topics,
)
from seg_worker import SegStage
from seg_worker.backend import SegBackend, UnsupportedMode
from seg_worker.config import SegConfig
from seg_worker.finishing import decode_rle
from seg_worker.grid import grid_points
from seg_worker.hf_configs import SAM2_ARCHS, sam2_arch_of, sam2_config
from seg_worker.hf_sam2 import Sam2Backend, build_sam2
from seg_worker.prompts import Prompt
from seg_worker.pyramid import predict_pyramid, view_items
from tests.kafka_utils import TopicReader
from tests.rel_utils import REPO, WorkerProcess, worker_env
from tests.test_seg_stage import HEATS, H, W, make_image

torch.set_num_threads(2)


# --- a saved tiny SAM 2.1 and a stage around it --------------------------------------------


def save_tiny_sam2(directory: Path, seed: int = 3) -> Path:
    """The tiny SAM 2.1, perturbed (so it is no seeded build), saved like a checkpoint."""
    model, processor = build_sam2("tiny", seed=seed)
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(0.5)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam2(tmp_path_factory.mktemp("sam2.1-tiny-saved"))


class Env:
    """A blob store, settings, a stage and a context, as the runtime would make them."""

    def __init__(self, root: Path, config: SegConfig | None = None, **settings: object) -> None:
        self.store = LocalBlobStore(root / "blobs")
        self.settings = Settings(**{"blob_url": str(self.store.root), **settings})  # type: ignore[arg-type]
        self.stage = SegStage(self.settings, config)
        self.image = make_image()
        self.image_ref = self.store.put(
            "gen/img.png", encode_png(Image.fromarray(self.image)), "image/png"
        )

    def ctx(self) -> StageContext:
        return StageContext(blob=self.store, topics=Topics("t"), settings=self.settings)

    def event(
        self,
        targets: list[str],
        *,
        heat: bool = True,
        request_id: str = "req-1",
        **seg: object,
    ) -> ImageReadyEvent:
        heatmaps = {
            t: self.store.put(f"gen/heat-{t}.png", encode_heatmap(HEATS[t]), "image/png")
            for t in targets
            if heat and t in HEATS
        }
        params = ResolvedParams(
            prompt="a cup and a plate",
            width=W,
            height=H,
            steps=2,
            guidance_scale=7.5,
            sampler="dpmpp_2m",
            seed=1,
        )
        return ImageReadyEvent.model_validate(
            {
                "id": request_id,
                "image": self.image_ref,
                "params": params,
                "model": "tiny",
                "heatmaps": heatmaps,
                "targets": targets,
                "segmentation": {"min_confidence": 0.0, "smooth_px": 1, **seg},
            }
        )

    def handle(self, *events: ImageReadyEvent) -> list:
        return self.stage.handle(list(events), self.ctx())

    def ok(self, event: ImageReadyEvent) -> tuple[MasksReadyEvent, AssetReadyEvent]:
        (result,) = self.handle(event)
        assert isinstance(result, list), result
        masks, assets = result[0].event, result[-1].event
        assert isinstance(masks, MasksReadyEvent) and isinstance(assets, AssetReadyEvent)
        return masks, assets

    def png(self, ref: BlobRef) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.store.get(ref))))

    def fix_sam2_scores(self, scores: list[float]) -> None:
        """Make SAM 2.1 predict these IoUs for its three multimask outputs (the head
        ends in a sigmoid: the bias is their logit)."""
        head = self.stage.predictor.model.mask_decoder.iou_prediction_head.proj_out
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, *(math.log(s / (1 - s)) for s in scores)]))


@pytest.fixture
def sam2(tmp_path: Path, sam2_dir: Path) -> Env:
    # the automatic mode as the tiny profile tunes it: a random model is never stable
    config = SegConfig.for_profile("tiny")
    return Env(tmp_path, config, models="pretrained", segmenter="sam2", sam2_model=str(sam2_dir))


def check_objects(env: Env, masks: MasksReadyEvent, assets: AssetReadyEvent) -> None:
    """Every object's mask PNG, RLE, area, box and RGBA cut-out agree."""
    assert assets.masks == [o.mask for o in masks.objects]
    assert [o.score for o in masks.objects] == sorted(
        (o.score for o in masks.objects), reverse=True
    )
    for obj, item in zip(masks.objects, assets.assets, strict=True):
        mask = env.png(obj.mask) == 255
        np.testing.assert_array_equal(decode_rle(obj.rle.model_dump()), mask)
        assert obj.rle.size == [H, W] and obj.area == int(mask.sum()) > 0
        x, y, w, h = (int(v) for v in obj.bbox)
        rgba = env.png(item.asset)
        assert rgba.shape == (h, w, 4)
        np.testing.assert_array_equal(rgba[..., 3] == 255, mask[y : y + h, x : x + w])
        assert (item.label, item.score) == (obj.label, obj.score)


# --- building and loading ------------------------------------------------------------------


def test_tiny_sam2_is_seeded_and_deterministic() -> None:
    a, _ = build_sam2("tiny")
    b, _ = build_sam2("tiny")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c, _ = build_sam2("tiny", seed=1)
    assert not torch.equal(a.mask_decoder.iou_token.weight, c.mask_decoder.iou_token.weight)


def test_pretrained_sam2_loads_what_was_saved(sam2: Env, sam2_dir: Path) -> None:
    saved, _ = build_sam2("tiny", seed=3)
    sam2.stage.setup()
    loaded = sam2.stage.predictor
    assert isinstance(loaded, Sam2Backend) and isinstance(loaded, SegBackend)
    assert not torch.equal(
        saved.mask_decoder.iou_token.weight, loaded.model.mask_decoder.iou_token.weight
    )
    with torch.no_grad():
        saved.mask_decoder.iou_token.weight.add_(0.5)
    for (name, pa), pb in zip(
        saved.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert sam2.stage.segmenter_id == f"sam2:{sam2_dir.name}"
    assert loaded.side == 256 and loaded.processor.size.height == 256


@pytest.mark.parametrize("size", list(SAM2_ARCHS))
def test_random_sam2_sizes_are_the_released_architectures(size: str) -> None:
    arch = sam2_arch_of(f"facebook/sam2.1-hiera-{size}")
    assert arch.name == size
    config = sam2_config(arch)
    with torch.device("meta"):
        built = Sam2Model(config)
    trunk = built.vision_encoder.backbone
    assert len(trunk.blocks) == sum(arch.stages)
    assert [b.window_size for b in trunk.blocks if b.window_size == 0] == [0] * len(
        arch.global_att_blocks
    )
    assert trunk.blocks[-1].dim_out == arch.embed_dim * 8
    assert built.config.vision_config.backbone_feature_sizes == [[256, 256], [128, 128], [64, 64]]


def test_sam2_model_names_that_name_no_size_are_refused() -> None:
    with pytest.raises(ValueError, match=r"SAM2_MODEL 'facebook/sam-vit-huge' names no SAM 2\.1"):
        sam2_arch_of("facebook/sam-vit-huge")


# --- every prompt mode on SAM 2.1 ----------------------------------------------------------


def test_sam2_attention_mode_events(sam2: Env) -> None:
    masks, assets = sam2.ok(sam2.event(["cup", "plate"]))
    assert {o.label for o in masks.objects} == {"cup", "plate"}
    assert assets.status == "ok" and masks.segmenter == assets.segmenter
    assert masks.segmenter is not None and masks.segmenter.startswith("sam2:")
    check_objects(sam2, masks, assets)
    again, _ = sam2.ok(sam2.event(["cup", "plate"], request_id="req-2"))
    assert [o.rle for o in again.objects] == [o.rle for o in masks.objects]  # deterministic


def test_sam2_boxes_points_and_auto_modes(sam2: Env) -> None:
    masks, assets = sam2.ok(
        sam2.event(["cup"], mode="boxes", boxes=[[24, 16, 32, 32], [112, 80, 32, 24]])
    )
    assert sorted(o.label for o in masks.objects) == ["box-1", "cup"]
    check_objects(sam2, masks, assets)
    masks, assets = sam2.ok(
        sam2.event(
            ["cup", "plate"],
            mode="points",
            points=[{"x": 40, "y": 30}, {"x": 128, "y": 90}, {"x": 5, "y": 5, "label": 0}],
        )
    )
    assert sorted(o.label for o in masks.objects) == ["cup", "plate"]
    check_objects(sam2, masks, assets)
    masks, assets = sam2.ok(sam2.event(["cup"], mode="auto", heat=False))
    assert masks.objects and {o.label for o in masks.objects} == {"cup"}
    check_objects(sam2, masks, assets)
    assert sam2.stage.predictor.encoder_images == 1  # every mode reused one embedding


def test_sam2_grid_filters_like_the_automatic_generator(sam2: Env) -> None:
    sam2.stage.setup()
    backend = sam2.stage.predictor
    emb = backend.embed(("img", 1.0, None), sam2.image)
    found = backend.automatic(
        emb, sam2.image, points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0,
        stability_thresh=0.0,
    )  # fmt: skip
    assert found and all(m.shape == (H, W) and m.dtype == bool for _, m in found)
    assert [s for s, _ in found] == sorted((s for s, _ in found), reverse=True)
    boxes = [_box(m) for _, m in found]
    for i, a in enumerate(boxes):  # box non-maximum suppression at 0.7 left no near-twin
        assert all(_box_iou(a, b) <= 0.7 for b in boxes[i + 1 :])
    sam2.fix_sam2_scores([0.3, 0.6, 0.4])
    kept = backend.automatic(
        emb, sam2.image, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.5,
        stability_thresh=0.0,
    )  # fmt: skip
    assert kept and all(abs(s - 0.6) < 1e-5 for s, _ in kept)  # the IoU filter is strict >
    assert not backend.automatic(
        emb, sam2.image, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.6,
        stability_thresh=0.0,
    )  # fmt: skip
    np.testing.assert_allclose(grid_points(2, 10, 20), [[5, 2.5], [15, 2.5], [5, 7.5], [15, 7.5]])


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0


def test_sam2_min_confidence_max_objects_and_crop_retry(sam2: Env) -> None:
    sam2.fix_sam2_scores([0.5, 0.9, 0.7])
    masks, _ = sam2.ok(sam2.event(["cup", "plate", "spoon"], max_objects=2, min_confidence=0.85))
    assert len(masks.objects) == 2 and all(abs(o.score - 0.9) < 1e-5 for o in masks.objects)
    sam2.fix_sam2_scores([0.1, 0.2, 0.3])
    masks, assets = sam2.ok(sam2.event(["spoon"], min_confidence=0.8, request_id="req-2"))
    assert assets.status == "no_match" and masks.segmenter == assets.segmenter
    cache = sam2.stage.predictor.cache
    crops = [key[2] for key in cache._items if key[2] is not None]
    assert len(crops) == 1  # nothing passed: one more try on a crop around the heat peak
    x0, y0, x1, y1 = crops[0]
    assert x0 <= 64 < x1 and y0 <= 64 < y1 and (x1 - x0) < W


def test_sam2_pyramid_merges_scales(sam2: Env) -> None:
    masks, _ = sam2.ok(sam2.event(["cup", "plate"], scales=[0.5, 1.0]))
    backend = sam2.stage.predictor
    assert backend.encoder_images == 2  # one per scale, shared by both targets
    assert masks.objects and all(o.rle.size == [H, W] for o in masks.objects)
    embs = backend.embed_many(view_items(sam2.image, sam2.image_ref.sha256, [0.5, 1.0]))
    assert backend.encoder_images == 2 and [e.original_size for e in embs] == [(64, 80), (H, W)]
    points, labels = np.array([[40.0, 30.0]]), np.array([1])
    merged = predict_pyramid(
        backend, embs, _prompt(points, labels), (H, W)
    )  # the mean of the two views' predictions
    singles = [
        backend.predict_low_res(e, points=points, point_labels=labels, box=None, frame_size=(H, W))
        for e in embs
    ]
    np.testing.assert_allclose(merged.scores, (singles[0][1] + singles[1][1]) / 2, rtol=1e-5)
    expected = sum(
        backend.upsample(e, low[merged.best : merged.best + 1], (H, W))[0]
        for e, (low, _) in zip(embs, singles, strict=True)
    )
    torch.testing.assert_close(merged.logits, expected / 2)


def _prompt(points: np.ndarray, labels: np.ndarray) -> Prompt:
    return Prompt("t", points.astype(np.float32), labels.astype(np.int32))


# --- the embedding cache, per backend ------------------------------------------------------


@pytest.mark.parametrize("backend", ["sam", "sam2"])
def test_second_target_on_the_same_image_does_not_reencode(
    backend: str, tmp_path: Path, sam2_dir: Path
) -> None:
    env = Env(tmp_path, models="tiny", segmenter=backend)
    env.stage.setup()
    model = env.stage.predictor.model
    encoder = model.image_encoder if backend == "sam" else model.vision_encoder
    calls: list[int] = []
    encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(1))
    env.ok(env.event(["cup"]))
    env.ok(env.event(["plate"], request_id="req-2"))  # another target, same image
    env.ok(env.event(["cup", "plate"], request_id="req-3"))
    assert len(calls) == 1 and env.stage.predictor.encoder_images == 1
    assert env.stage.predictor.cache.hits >= 2


def test_a_batch_of_images_shares_one_sam2_encoder_pass(sam2: Env) -> None:
    other = make_image()[:, ::-1].copy()
    ref = sam2.store.put("gen/other.png", encode_png(Image.fromarray(other)), "image/png")
    second = sam2.event(["cup"], request_id="b").model_copy(update={"image": ref})
    results = sam2.handle(sam2.event(["cup"]), second)
    assert all(isinstance(r, list) for r in results)
    assert sam2.stage.predictor.encoder_images == 2 and sam2.stage.predictor.encoder_batches == 1


# --- which model made it -------------------------------------------------------------------


def test_sam_backend_names_its_architecture_and_weights(tmp_path: Path) -> None:
    env = Env(tmp_path, models="tiny")
    masks, assets = env.ok(env.event(["cup"]))
    assert masks.segmenter == assets.segmenter == "sam:tiny:tiny"
    sam2_env = Env(tmp_path / "b", models="tiny", segmenter="sam2")
    masks, _ = sam2_env.ok(sam2_env.event(["cup"]))
    assert masks.segmenter == "sam2:tiny"


# --- modes a backend does not serve, and settings that cannot start ------------------------


@pytest.mark.parametrize("backend", ["sam", "sam2"])
@pytest.mark.parametrize("mode", ["concept", "attention+concept"])
def test_concept_modes_dead_letter_without_sam3(backend: str, mode: str, tmp_path: Path) -> None:
    env = Env(tmp_path, models="tiny", segmenter=backend)
    (result,) = env.handle(env.event(["cup"], mode=mode))
    assert isinstance(result, UnsupportedMode) and isinstance(result, PermanentError)
    assert result.error_type == "unsupported_mode"
    assert "GENSEG_SEGMENTER=sam3" in str(result) and repr(mode) in str(result)
    assert env.stage.predictor.encoder_images == 0  # refused before any model work


def test_unknown_segmenter_fails_at_start_in_one_line(tmp_path: Path) -> None:
    settings = Settings(blob_url=str(tmp_path), models="tiny")
    stage = SegStage(settings.model_copy(update={"segmenter": "sam4"}))
    with pytest.raises(ValueError, match="unknown GENSEG_SEGMENTER 'sam4'") as info:
        stage.setup()
    assert "\n" not in str(info.value) and "sam, sam2, sam3" in str(info.value)


@pytest.mark.parametrize("backend", ["sam2", "sam3"])
def test_toy_profile_runs_segment_anything_only(backend: str, tmp_path: Path) -> None:
    stage = SegStage(Settings(blob_url=str(tmp_path), models="toy", segmenter=backend))
    with pytest.raises(ValueError, match="toy profile runs segment-anything only") as info:
        stage.setup()
    assert "\n" not in str(info.value) and f"GENSEG_SEGMENTER={backend}" in str(info.value)


@pytest.mark.parametrize(("backend", "setting"), [("sam2", "SAM2_MODEL"), ("sam3", "SAM3_MODEL")])
def test_a_missing_pretrained_directory_is_said_in_words(
    backend: str, setting: str, tmp_path: Path
) -> None:
    missing = tmp_path / "not-there"
    settings = Settings(blob_url=str(tmp_path), models="pretrained", segmenter=backend)
    stage = SegStage(settings.model_copy(update={setting.lower(): str(missing)}))
    with pytest.raises(FileNotFoundError, match=f"{setting} '{missing}' is not a directory"):
        stage.setup()


def test_worker_with_an_unknown_segmenter_stops_at_start(tmp_path: Path) -> None:
    """The real CLI: a non-zero exit, one line naming the setting and its values."""
    env = worker_env(Settings(blob_url=str(tmp_path)), GENSEG_SEGMENTER="sam4")
    done = subprocess.run(
        [sys.executable, "-m", "genseg.cli", "worker", "seg"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "GENSEG_SEGMENTER" in output and "sam3" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output


# --- end to end: the real CLI workers ------------------------------------------------------


async def run_pipeline(
    settings: Settings,
    tmp_path: Path,
    seg_env: dict[str, str],
    prompt: PromptEvent,
) -> tuple[dict, dict]:
    """``genseg worker gen`` (tiny) and ``genseg worker seg`` (``seg_env``) as processes;
    one prompt in; its mask-ready and asset-ready events out."""
    await ensure_topics(settings, partitions=1)
    gen = WorkerProcess("gen", worker_env(settings), tmp_path)
    seg = WorkerProcess("seg", worker_env(settings, **seg_env), tmp_path, args=["--no-scenes"])
    try:
        gen.start()
        seg.start()
        await asyncio.gather(gen.wait_assigned(180), seg.wait_assigned(180))
        async with TopicReader(settings, "masks", "assets") as reader:
            async with Publisher(settings) as pub:
                sent = await pub.send(
                    settings.topics.prompts, prompt.to_json_bytes(), key=prompt.id, headers=[]
                )
                await sent

            def done() -> bool:
                gen.check_alive()  # a worker that died fails the test at once, with its log
                seg.check_alive()
                return bool(reader.values("masks")) and bool(reader.values("assets"))

            await reader.until(done, timeout=240)
        return reader.values("masks")[0], reader.values("assets")[0]
    finally:
        gen.stop()
        seg.stop()


@pytest.mark.timeout(420)
async def test_pipeline_end_to_end_with_sam2(
    settings: Settings, tmp_path: Path, sam2_dir: Path
) -> None:
    prompt = PromptEvent(
        id="e2e-sam2", prompt="a red cup on a wooden table", targets=["cup"], width=64,
        height=64, steps=2, seed=5, segmentation=SegmentationOptions(min_confidence=0.0),
    )  # fmt: skip
    seg_env = {
        "GENSEG_SEGMENTER": "sam2",
        "GENSEG_MODELS": "pretrained",
        "SAM2_MODEL": str(sam2_dir),
    }
    masks, assets = await run_pipeline(settings, tmp_path, seg_env, prompt)
    assert masks["segmenter"] == assets["segmenter"] == f"sam2:{sam2_dir.name}"
    assert assets["status"] == "ok" and assets["id"] == "e2e-sam2"
    assert len(assets["assets"]) == len(masks["objects"]) >= 1
    store = BlobStore.from_url(settings.blob_url)
    for obj in masks["objects"]:
        assert obj["label"] == "cup" and obj["rle"]["size"] == [64, 64]
        mask = np.asarray(Image.open(io.BytesIO(store.get(BlobRef(**obj["mask"])))))
        np.testing.assert_array_equal(decode_rle(obj["rle"]), mask == 255)
