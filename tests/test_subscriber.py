"""The downstream API (subscribe, wait_for) and the upstream client, against a real broker."""

from __future__ import annotations

import gc
import warnings

import pytest
from pydantic import ValidationError

from consumers.subscriber import Subscriber, partition_for_key, wait_for
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.client import GensegClient
from producers.publisher import Publisher
from schemas import (
    AssetReadyEvent,
    BlobRef,
    DeadLetterEvent,
    ErrorInfo,
    ProgressEvent,
    PromptEvent,
    SourceInfo,
)
from tests.kafka_utils import TopicReader

REF = BlobRef(uri="file:///x/y.png", sha256="0" * 64, media_type="image/png", bytes=1)


def asset(request_id: str, index: int = 0) -> AssetReadyEvent:
    return AssetReadyEvent(id=request_id, image_index=index, status="no_match", image=REF)


def dead(request_id: str, index: int | None) -> DeadLetterEvent:
    return DeadLetterEvent(
        id=request_id, image_index=index, stage="gen",
        error=ErrorInfo(type="validation", message="bad"), attempts=0,
        source=SourceInfo(topic="t", partition=0, offset=0),
    )  # fmt: skip


async def test_partition_for_key_agrees_with_kafka(settings: Settings) -> None:
    await ensure_topics(settings, partitions=4)
    async with Publisher(settings) as pub:
        for key in ("a", "req-1", "x.y:z", "demo-0123456789abcdef", "b", "c", "d"):
            meta = await pub.publish(settings.topics.assets, asset(key))
            assert meta.partition == partition_for_key(key, 4)


async def test_wait_for_reads_history_and_dedupes(settings: Settings) -> None:
    await ensure_topics(settings, partitions=4)
    async with Publisher(settings) as pub:
        await pub.publish(settings.topics.assets, asset("other"))
        await pub.publish(settings.topics.assets, asset("r1", 1))
        await pub.publish(settings.topics.assets, asset("r1", 1))  # a redelivered duplicate
        await pub.publish(settings.topics.dlq, dead("r1", 0))
    outcomes = await wait_for(settings, "r1", num_images=2, timeout=30)
    assert [type(o).__name__ for o in outcomes] == ["DeadLetterEvent", "AssetReadyEvent"]
    with pytest.raises(TimeoutError):
        await wait_for(settings, "r1", num_images=3, timeout=2)


async def test_dead_letter_without_index_ends_every_image(settings: Settings) -> None:
    await ensure_topics(settings, partitions=4)
    async with Subscriber(settings, ["assets", "dlq"]) as sub:
        async with Publisher(settings) as pub:
            await pub.publish(settings.topics.dlq, dead("r2", None))
        outcomes = await sub.wait_for("r2", num_images=3, timeout=30)
    assert len(outcomes) == 3 and all(isinstance(o, DeadLetterEvent) for o in outcomes)


async def test_latest_subscriber_sees_everything_after_start(settings: Settings) -> None:
    await ensure_topics(settings, partitions=4)
    async with Publisher(settings) as pub:
        await pub.publish(settings.topics.progress, ProgressEvent(id="old", step=1, steps=2))
        async with Subscriber(settings, ["progress"]) as sub:
            for i in range(20):
                await pub.publish(
                    settings.topics.progress, ProgressEvent(id=f"n{i}", step=1, steps=2)
                )
            seen: list[str] = []
            async for event in sub:
                seen.append(event.id)
                if len(seen) == 20:
                    break
    assert sorted(seen) == sorted(f"n{i}" for i in range(20))


async def test_client_submits_valid_events_and_views(settings: Settings) -> None:
    await ensure_topics(settings, partitions=4)
    async with GensegClient(settings) as client:
        one = await client.submit("a cup", targets=["cup"], width=256, height=256)
        views = await client.submit_views("a living room", targets=["sofa"], scene_id="room1")
        with pytest.raises(ValidationError):
            await client.submit("x", width=65)
    assert views == [f"room1.view-{a}" for a in (0, 45, 90, 135)]
    async with TopicReader(settings, "prompts") as reader:
        await reader.until(lambda: len(reader.keys("prompts")) == 5)
    events = {e["id"]: PromptEvent.model_validate(e) for e in reader.values("prompts")}
    assert events[one].width == 256 and events[one].targets == ["cup"]
    assert all("view from" in events[v].prompt for v in views)
    assert {events[v].steps for v in views} == {25}, "views share parameters, so they batch"


async def test_missing_topic_fails_with_a_hint_and_closes_the_consumer(settings: Settings) -> None:
    sub = Subscriber(settings, ["assets"])  # nothing created the topics
    with pytest.raises(LookupError, match="genseg topics create"):
        await sub.__aenter__()
    # ``async with`` calls no stop() after a failed start; an open consumer would warn
    # "Unclosed AIOKafkaConsumer" when collected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del sub
        gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)]
