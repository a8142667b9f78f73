"""The generator worker against a real broker: batches form, bad requests are dead-lettered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from consumers.runtime import RuntimeConfig, StageRuntime
from gen_worker.handler import GenStage
from plumbing.blobstore import BlobStore
from plumbing.images import decode_image, encode_png
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import ImageReadyEvent, InpaintEvent, ProgressEvent, PromptEvent
from tests.kafka_utils import TopicReader

FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 50}


@pytest.fixture(autouse=True)
def few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def histogram_totals(histogram: Any) -> dict[str, float]:
    """``_count`` (observations) and ``_sum`` of a prometheus histogram, via its public API."""
    [metric] = histogram.collect()
    return {
        s.name.removeprefix(metric.name): s.value
        for s in metric.samples
        if s.name.endswith(("_count", "_sum"))
    }


async def test_compatible_prompts_are_batched_under_load(settings: Settings) -> None:
    ids = [f"batch-{i}" for i in range(8)]
    prompts = [
        PromptEvent(
            id=i,
            prompt=f"a coffee cup number {n}",
            targets=["coffee cup"],
            width=64,
            height=64,
            steps=4,
            seed=n,
        )
        for n, i in enumerate(ids)
    ]
    config = RuntimeConfig(max_batch=4, max_wait_ms=200, **FAST)
    async with StageRuntime(GenStage(settings), settings, config) as rt:
        async with Publisher(settings) as pub:
            # All at once: the worker is busy with the first, the rest queue up.
            await asyncio.gather(*(pub.publish(settings.topics.prompts, p) for p in prompts))
        async with TopicReader(settings, "images", "progress") as reader:
            await reader.until(lambda: set(reader.keys("images")) == set(ids), timeout=120)
        observed = histogram_totals(rt.metrics.batch_size)
    batches, images = observed["_count"], observed["_sum"]
    assert images == 8
    assert batches < images, "at least one batch held more than one request"
    store = BlobStore.from_url(settings.blob_url)
    for value in reader.values("images"):
        event = ImageReadyEvent.model_validate(value)
        assert event.params.seed == ids.index(event.id)
        assert set(event.heatmaps) == {"coffee cup"}
        image = decode_image(store.get(event.image), max_pixels=64 * 64)
        assert image.size == (64, 64)
    progress = [ProgressEvent.model_validate(v) for v in reader.values("progress")]
    assert {p.id for p in progress} == set(ids)
    assert all(any(p.id == i and p.step == p.steps == 4 for p in progress) for i in ids)


async def test_invalid_requests_reach_the_dead_letter_topic(settings: Settings) -> None:
    store = BlobStore.from_url(settings.blob_url)
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    bad_inpaint = InpaintEvent(
        id="bad-mask",
        prompt="a red apple",
        width=64,
        height=64,
        steps=2,
        image=store.put("inputs/bad-mask/image.png", encode_png(image), "image/png"),
        mask=store.put(
            "inputs/bad-mask/mask.png", encode_png(Image.new("L", (32, 32), 255)), "image/png"
        ),
    )
    raw = {
        "bad-size": {"id": "bad-size", "prompt": "a cup", "width": 100},
        "bad-steps": {"id": "bad-steps", "prompt": "a cup", "steps": 0},
        "bad-sampler": {"id": "bad-sampler", "prompt": "a cup", "sampler": "plms"},
        "bad-prompt": {"id": "bad-prompt", "prompt": "x" * 3000},
        "bad-mask": json.loads(bad_inpaint.to_json_bytes()),
    }
    expected = {
        "bad-size": ("validation", "multiple of 8"),
        "bad-steps": ("validation", "steps"),
        "bad-sampler": ("validation", "sampler"),
        "bad-prompt": ("validation", "prompt"),
        "bad-mask": ("invalid_request", "mask is 32x32 pixels"),
    }
    good = PromptEvent(id="good", prompt="a cup", width=64, height=64, steps=2, seed=1)
    async with StageRuntime(GenStage(settings), settings, RuntimeConfig(max_batch=4, **FAST)):
        async with Publisher(settings) as pub:
            for key, value in raw.items():
                await pub.send(
                    settings.topics.prompts, json.dumps(value).encode(), key=key, headers=[]
                )
            await pub.publish(settings.topics.prompts, good)
        async with TopicReader(settings, "images", "dlq") as reader:
            await reader.until(
                lambda: set(reader.keys("dlq")) >= set(raw) and "good" in reader.keys("images"),
                timeout=120,
            )
    dead = {d["id"]: d for d in reader.values("dlq")}
    assert set(dead) == set(raw), "only the invalid requests are dead-lettered"
    for request_id, (error_type, phrase) in expected.items():
        d = dead[request_id]
        assert d["stage"] == "gen" and d["source"]["topic"] == settings.topics.prompts
        assert d["error"]["type"] == error_type, d
        assert phrase in d["error"]["message"], d
        assert d["attempts"] <= 1  # never retried: retrying cannot help
    assert reader.keys("images") == ["good"]
