"""The segmenter worker against a real broker: image-ready in, masks and asset out, DLQ."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from consumers.runtime import RuntimeConfig, StageRuntime
from plumbing.blobstore import BlobStore
from plumbing.images import encode_heatmap, encode_png
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import (
    AssetReadyEvent,
    ImageReadyEvent,
    MasksReadyEvent,
    ResolvedParams,
    SegmentationOptions,
)
from seg_worker import SegStage
from tests.kafka_utils import TopicReader

torch.set_num_threads(2)

FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 50}


def image_ready(settings: Settings, request_id: str) -> ImageReadyEvent:
    store = BlobStore.from_url(settings.blob_url)
    image = np.full((64, 96, 3), 80, np.uint8)
    image[8:40, 8:40] = (220, 30, 30)
    heat = np.zeros((8, 12), np.float32)
    heat[1:5, 1:5] = 1.0
    return ImageReadyEvent(
        id=request_id,
        image=store.put(
            f"{request_id}/0/gen/image.png", encode_png(Image.fromarray(image)), "image/png"
        ),
        params=ResolvedParams(
            prompt="a red cup",
            width=96,
            height=64,
            steps=2,
            guidance_scale=7.5,
            sampler="dpmpp_2m",
            seed=3,
        ),
        model="tiny",
        heatmaps={
            "cup": store.put(f"{request_id}/0/gen/heat-cup.png", encode_heatmap(heat), "image/png")
        },
        targets=["cup"],
        segmentation=SegmentationOptions(min_confidence=0.5, smooth_px=0),
        timings_ms={"gen.denoise": 5.0},
    )


async def test_image_ready_yields_masks_and_asset_and_bad_reference_dead_letters(
    settings: Settings, tmp_path
) -> None:
    good = image_ready(settings, "seg-ok")
    bad = image_ready(settings, "seg-bad").model_copy(deep=True)
    bad.image = bad.image.model_copy(update={"uri": (tmp_path / "nowhere.png").as_uri()})
    stage = SegStage(settings)
    stage.setup()
    # the tiny model's random IoU head may score below 0: make it say 0.9, whatever the input
    head = stage.predictor.model.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(0.9)
    async with StageRuntime(stage, settings, RuntimeConfig(**FAST)):
        async with Publisher(settings) as pub:
            await pub.publish(settings.topics.images, good)
            await pub.publish(settings.topics.images, bad)
        async with TopicReader(settings, "masks", "assets", "dlq") as reader:
            await reader.until(
                lambda: "seg-ok" in reader.keys("assets") and "seg-bad" in reader.keys("dlq"),
                timeout=120,
            )
    masks = MasksReadyEvent.model_validate(reader.values("masks")[0])
    asset = AssetReadyEvent.model_validate(reader.values("assets")[0])
    assert masks.id == asset.id == "seg-ok" and reader.keys("masks") == ["seg-ok"]
    assert asset.status == "ok" and asset.image == good.image and asset.assets
    assert [a.label for a in asset.assets] == [o.label for o in masks.objects]
    assert asset.timings_ms["gen.denoise"] == 5.0 and "seg.embed" in asset.timings_ms
    store = BlobStore.from_url(settings.blob_url)
    for item in asset.assets:  # every reference resolves, with its sha256 verified
        assert store.get(item.asset)[:8] == b"\x89PNG\r\n\x1a\n"
    (dead,) = reader.values("dlq")
    assert dead["id"] == "seg-bad" and dead["stage"] == "seg"
    assert dead["error"]["type"] == "foreign_blob_ref" and dead["attempts"] == 1
    assert dead["source"]["topic"] == settings.topics.images
    assert "seg-bad" not in reader.keys("assets")
