"""Scene manifests: one scene-ready event when every view of a scene is done.

The segmenter publishes a small "view done" record (:class:`SceneViewRecord`) per
finished scene image to the internal topic ``{prefix}.scene-views``, keyed by
``scene_id``: every view of a scene lands on one partition, so one member of the
``scene`` consumer group sees them all, in order. :class:`SceneStage` records each
view under a deterministic blob key (a redelivery overwrites), and when all
``views_total`` views (with all their images) are present, returns the
``genseg.scene/v1`` event for the runtime to publish on ``{prefix}.scenes``.

Exactly one scene-ready event, without Kafka transactions (see docs/scenes.md):

- ``_scenes/{scene_id}/published.json`` (the marker) means the event is on the topic:
  nothing more to do. It is written when a check found the event there.
- Before the first publish, ``_scenes/{scene_id}/intent.json`` records the scenes
  topic's end offsets. A record of a complete scene that finds an intent but no marker
  comes after a publish that may or may not have happened (a crash, a failed send, a
  redelivery): it reads the scenes topic from the recorded offsets, and publishes only
  when the scene's event is not there. The read covers only what was written since the
  intent, and happens only in that rare case; the normal path costs one end-offset
  query per scene.

This relies on one handler at a time per partition (``RuntimeConfig.concurrency`` 1,
the default; the runtime publishes a record's outputs before it takes the next one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine, Hashable
from typing import Any, Literal, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import Field

from consumers.stage import ItemResult, Output, Stage, StageContext, TransientError
from plumbing.blobstore import BlobNotFound, BlobStore, BlobUnavailable, scene_key
from plumbing.settings import Settings
from schemas import AssetReadyEvent, Event, SceneReadyEvent, SceneView, parse_event
from schemas.events import RequestId, TenantId

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_SCENE_VIEW = "genseg.scene_view/v1"
JSON = "application/json"
#: Largest scene state blob read back (a view record is about 1 KiB).
_STATE_LIMIT = 1 << 20


class SceneViewRecord(Event):
    """Internal: one finished image of a scene view, on ``{prefix}.scene-views``."""

    schema_: Literal["genseg.scene_view/v1"] = Field(default=SCHEMA_SCENE_VIEW, alias="schema")
    scene_id: RequestId
    views_total: int = Field(ge=1, le=64)
    #: Images per view (the request's ``num_images``): a view is done when all are.
    num_images: int = Field(default=1, ge=1, le=8)
    tenant: TenantId | None = None
    view: SceneView


def view_record(event: AssetReadyEvent, num_images: int = 1) -> SceneViewRecord:
    """The "view done" record of a scene image's asset-ready event (``event.scene`` set)."""
    scene = event.scene
    if scene is None:
        raise ValueError(f"{event.id} is not part of a scene")
    return SceneViewRecord(
        scene_id=scene.scene_id,
        views_total=scene.views_total,
        num_images=num_images,
        tenant=event.tenant,
        view=SceneView(
            view=scene.view,
            angle=scene.angle,
            id=event.id,
            image_index=event.image_index,
            status=event.status,
            image=event.image,
            depth=event.depth,
            mesh=event.mesh,
            objects=[item.label for item in event.assets],
        ),
    )


def is_complete(records: list[SceneViewRecord], views_total: int) -> bool:
    """``views_total`` distinct views, each with all of its ``num_images`` images."""
    images: dict[str, set[int]] = {}
    wanted: dict[str, int] = {}
    for rec in records:
        images.setdefault(rec.view.view, set()).add(rec.view.image_index)
        wanted[rec.view.view] = rec.num_images
    return len(images) >= views_total and all(
        set(range(wanted[view])) <= indices for view, indices in images.items()
    )


def manifest(scene_id: str, records: list[SceneViewRecord]) -> SceneReadyEvent:
    """The scene-ready event: views ordered by angle (then name), images by index."""
    views = sorted(
        (r.view for r in records),
        key=lambda v: (v.angle is None, v.angle or 0.0, v.view, v.image_index),
    )
    tenant = next((r.tenant for r in records if r.tenant), None)
    return SceneReadyEvent(scene_id=scene_id, views=views, tenant=tenant)


class SceneState:
    """Scene bookkeeping in the blob store, under ``_scenes/{scene_id}/``."""

    def __init__(self, blob: BlobStore) -> None:
        self.blob = blob

    def record_view(self, rec: SceneViewRecord) -> None:
        """Write ``views/{view}/{image_index}.json`` (deterministic: a redelivery overwrites)."""
        key = scene_key(rec.scene_id, "views", rec.view.view, f"{rec.view.image_index}.json")
        self.blob.put(key, rec.to_json_bytes(), JSON)

    def views(self, scene_id: str) -> list[SceneViewRecord]:
        """Every recorded view image of ``scene_id`` (unreadable records are skipped)."""
        records = []
        for key in self.blob.list_keys(scene_key(scene_id, "views")):
            try:
                records.append(parse_event(self._read(key) or b"", SceneViewRecord))
            except ValueError as exc:  # InvalidEvent: a damaged record must not block the scene
                log.warning("scene %s: skipping unreadable view record %s: %s", scene_id, key, exc)
        return records

    def intent(self, scene_id: str) -> dict[int, int] | None:
        """The scenes topic's end offsets (partition -> offset) before the first publish."""
        data = self._read(scene_key(scene_id, "intent.json"))
        if data is None:
            return None
        return {int(p): int(o) for p, o in json.loads(data)["end_offsets"].items()}

    def write_intent(self, scene_id: str, end_offsets: dict[int, int]) -> None:
        body = {"end_offsets": {str(p): o for p, o in sorted(end_offsets.items())}}
        self.blob.put(scene_key(scene_id, "intent.json"), json.dumps(body).encode(), JSON)

    def published(self, scene_id: str) -> bool:
        return self._read(scene_key(scene_id, "published.json")) is not None

    def mark_published(self, scene_id: str, partition: int, offset: int) -> None:
        body = {"partition": partition, "offset": offset}
        self.blob.put(scene_key(scene_id, "published.json"), json.dumps(body).encode(), JSON)

    def _read(self, key: str) -> bytes | None:
        try:
            return self.blob.get_key(key, max_bytes=_STATE_LIMIT)
        except BlobNotFound:
            return None


class ScenesTopic:
    """Reads the scenes topic: its end offsets, and whether a key appeared since some offsets.

    Each call runs its own short-lived consumer (no group, commits nothing) on a fresh
    event loop, so call it from a worker thread, never from a running loop.
    """

    def __init__(self, settings: Settings, *, timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.topic = settings.topics.scenes
        self.timeout_s = timeout_s

    def end_offsets(self) -> dict[int, int]:
        """Partition -> offset of the next record to be written."""
        return self._run(self._end_offsets())

    def find(self, key: str, since: dict[int, int]) -> tuple[int, int] | None:
        """(partition, offset) of the first record keyed ``key`` at or after ``since``
        (partitions missing from ``since`` are read from their start), or None."""
        return self._run(self._find(key.encode("utf-8"), since))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run(asyncio.wait_for(coro, self.timeout_s))
        except (KafkaError, TimeoutError, OSError) as exc:
            raise TransientError(f"reading {self.topic}: {exc!r}") from exc

    async def _consumer(self) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            client_id="genseg-scene-check",
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
            **self.settings.kafka_kwargs(),
        )
        await consumer.start()
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            await consumer.topics()  # refresh the metadata once
            partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            await consumer.stop()
            raise TransientError(f"topic {self.topic} has no partitions (not created yet?)")
        return consumer, [TopicPartition(self.topic, p) for p in sorted(partitions)]

    async def _end_offsets(self) -> dict[int, int]:
        consumer, tps = await self._consumer()
        try:
            ends = await consumer.end_offsets(tps)
            return {tp.partition: int(offset) for tp, offset in ends.items()}
        finally:
            await consumer.stop()

    async def _find(self, key: bytes, since: dict[int, int]) -> tuple[int, int] | None:
        consumer, tps = await self._consumer()
        try:
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            remaining = set()
            for tp in tps:
                start = since.get(tp.partition, 0)
                if start < ends[tp]:
                    consumer.seek(tp, start)
                    remaining.add(tp)
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        if record.key == key and record.offset < ends[tp]:
                            return tp.partition, record.offset
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return None
        finally:
            await consumer.stop()


class SceneStage(Stage[SceneViewRecord]):
    """Publishes one scene-ready event per complete scene (see the module docstring).

    Run it with ``RuntimeConfig(concurrency=1)`` (the default): one record at a time.
    """

    name = "scene"
    input_topic = "scene-views"

    def __init__(self, settings: Settings, *, topic: ScenesTopic | None = None) -> None:
        self.settings = settings
        self.topic = topic or ScenesTopic(settings)

    def parse(self, raw: bytes) -> SceneViewRecord:
        return parse_event(raw, SceneViewRecord)

    def batch_key(self, event: SceneViewRecord) -> Hashable | None:
        return None  # alone: each record sees the state the previous one left

    def request_id(self, event: SceneViewRecord) -> str | None:
        return event.view.id

    def image_index(self, event: SceneViewRecord) -> int | None:
        return event.view.image_index

    def handle(self, events: list[SceneViewRecord], ctx: StageContext) -> list[ItemResult]:
        results: list[ItemResult] = []
        for index, rec in enumerate(events):
            try:
                with ctx.phase("scene", item=index):
                    results.append(self._one(rec, SceneState(ctx.blob), ctx))
            except BlobUnavailable as exc:
                results.append(TransientError(f"scene state: {exc}"))
            except Exception as exc:  # the runtime classifies it: retried, or dead-lettered
                results.append(exc)
        return results

    def _one(self, rec: SceneViewRecord, state: SceneState, ctx: StageContext) -> list[Output]:
        scene_id = rec.scene_id
        state.record_view(rec)
        if state.published(scene_id):
            log.debug("scene %s already published; view %s recorded", scene_id, rec.view.view)
            return []
        records = state.views(scene_id)
        if not is_complete(records, rec.views_total):
            return []
        output = Output(ctx.topics.scenes, manifest(scene_id, records), key=scene_id)
        since = state.intent(scene_id)
        if since is None:  # the first publish: remember where the topic ended before it
            state.write_intent(scene_id, self.topic.end_offsets())
            log.info("scene %s complete: %d view images", scene_id, len(records))
            return [output]
        started = time.monotonic()
        found = self.topic.find(scene_id, since)
        log.info(
            "scene %s: checked the scenes topic after an unconfirmed publish in %.0f ms: %s",
            scene_id,
            (time.monotonic() - started) * 1000,
            f"found at {found}" if found else "absent, publishing",
        )
        if found is None:
            return [output]
        state.mark_published(scene_id, *found)
        return []
