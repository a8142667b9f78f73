"""The scene stage against a real broker: one scene-ready event per scene, whatever is redelivered.

The "view done" records are made by hand here (the seg stage's side is tested in
test_scene_assets.py); the crash windows are reproduced by not publishing what a
handler returned, which is exactly what a worker that dies before its publish leaves.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

import pytest
from aiokafka import TopicPartition

from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.stage import Output, StageContext
from consumers.topic_log import KafkaTopicLog
from plumbing.blobstore import BlobStore, scene_key
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from scene_worker import SceneStage
from scene_worker.manifest import is_complete, manifest
from schemas import BlobRef, SceneReadyEvent, SceneView, SceneViewRecord
from tests.kafka_utils import TopicReader, committed_offsets

FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 50}
ANGLES = ("0", "45", "90", "135")


def record(scene: str, view: str, *, image_index: int = 0, num_images: int = 1) -> SceneViewRecord:
    ref = BlobRef(uri=f"file:///x/{scene}/{view}.png", sha256="0" * 64, media_type="x", bytes=1)
    return SceneViewRecord(
        scene_id=scene,
        views_total=4,
        num_images=num_images,
        tenant="acme",
        view=SceneView(
            view=view,
            angle=float(view),
            id=f"{scene}.view-{view}",
            image_index=image_index,
            status="ok",
            image=ref,
            mesh=ref,
            objects=["sofa"],
        ),
    )


def context(settings: Settings) -> StageContext:
    return StageContext(
        blob=BlobStore.from_url(settings.blob_url),
        topics=settings.topics,
        settings=settings,
        topic_log=KafkaTopicLog(settings),  # what the runtime gives its handlers
    )


def handle(stage: SceneStage, settings: Settings, rec: SceneViewRecord) -> list[Output]:
    (result,) = stage.handle([rec], context(settings))
    assert isinstance(result, list), result
    return result


async def publish(settings: Settings, outputs: list[Output]) -> list[tuple[int, int]]:
    async with Publisher(settings) as pub:
        sent = [await pub.publish(o.topic, o.event, key=o.record_key) for o in outputs]
    return [(m.partition, m.offset) for m in sent]


def test_completion_needs_every_view_and_every_image() -> None:
    views = [record("s", v) for v in ANGLES]
    assert not is_complete(views[:3], 4)
    assert not is_complete([*views[:3], views[2]], 4), "a duplicate is not a fourth view"
    assert is_complete(views, 4)
    two = [record("s", v, image_index=i, num_images=2) for v in ANGLES for i in (0, 1)]
    assert not is_complete(two[:-1], 4) and is_complete(two, 4)
    event = manifest("s", list(reversed(views)))
    assert [v.view for v in event.views] == list(ANGLES), "ordered by angle"
    assert event.tenant == "acme" and event.scene_id == "s"


def test_the_last_view_publishes_and_a_redelivery_after_a_crash_publishes_once(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(ensure_topics(settings, partitions=3))
    blob = BlobStore.from_url(settings.blob_url)
    stage = SceneStage(settings)
    for view in ANGLES[:3]:
        assert handle(stage, settings, record("room", view)) == []
    last = record("room", "135")
    [output] = handle(stage, settings, last)
    assert output.topic == settings.topics.scenes and output.record_key == "room"
    event = output.event
    assert isinstance(event, SceneReadyEvent)
    assert [v.view for v in event.views] == list(ANGLES)
    assert [v.id for v in event.views] == [f"room.view-{a}" for a in ANGLES]
    # The worker "dies" before publishing: the output is lost, the record is redelivered
    # to the partition's next owner (a new stage, same blob store).
    successor = SceneStage(settings)
    [again] = handle(successor, settings, last)
    assert again.event == event, "nothing on the topic yet: publish"
    [(partition, offset)] = asyncio.run(publish(settings, [again]))
    # It "dies" again after the publish, before its commit: redelivered once more.
    caplog.set_level(logging.INFO, logger="scene_worker.stage")
    assert handle(SceneStage(settings), settings, last) == [], "found on the topic: not again"
    assert "found at" in caplog.text
    marker = json.loads(
        blob.get_key(scene_key("room", "published.json", tenant="acme"), max_bytes=1000)
    )
    assert marker == {"partition": partition, "offset": offset}
    # Later duplicates of any view stop at the marker, without reading the topic.
    caplog.clear()
    for view in ANGLES:
        assert handle(SceneStage(settings), settings, record("room", view)) == []
    assert "checked the scenes topic" not in caplog.text


async def test_the_runtime_publishes_one_scene_ready_event_per_scene(settings: Settings) -> None:
    await ensure_topics(settings, partitions=2)
    scenes = ("living", "kitchen")
    # Every view twice, interleaved across scenes, then more duplicates after completion:
    # what redeliveries after crashes look like to the consumer.
    records = [record(s, v) for v in ANGLES for s in scenes for _ in range(2)]
    records += [record("living", "0"), record("kitchen", "135")]
    async with Publisher(settings) as pub:
        sent = [await pub.publish(settings.topics.scene_views, r, key=r.scene_id) for r in records]
    ends = Counter(m.partition for m in sent)
    stage = SceneStage(settings)
    config = RuntimeConfig(**FAST)
    async with StageRuntime(stage, settings, config) as rt:
        async with TopicReader(settings, "scenes") as reader:
            await reader.until(lambda: set(reader.keys("scenes")) == set(scenes), timeout=60)
            # every record handled and committed: nothing more can come
            await reader.until(
                lambda: all(
                    rt.committed_offsets().get(TopicPartition(settings.topics.scene_views, p))
                    == max(m.offset for m in sent if m.partition == p) + 1
                    for p in ends
                ),
                timeout=60,
            )
            await reader.poll(500)
    assert Counter(reader.keys("scenes")) == dict.fromkeys(scenes, 1)
    for value in reader.values("scenes"):
        event = SceneReadyEvent.model_validate(value)
        assert [v.view for v in event.views] == list(ANGLES)
    committed = await committed_offsets(
        settings, rt.group_id, settings.topics.scene_views, partitions=2
    )
    assert sum(v or 0 for v in committed.values()) == len(records)
