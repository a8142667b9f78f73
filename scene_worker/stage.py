"""The scene stage: scene-view records in, one scene-ready event per complete scene out.

The segmenter publishes a small "view done" record (:class:`schemas.SceneViewRecord`)
per finished scene image to the internal topic ``{prefix}.scene-views``, keyed by
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

The stage touches no Kafka client: the runtime reads the topic for it
(``StageContext.topic_log``), and runs it one record at a time (``sequential``), its
outputs acknowledged before the next record's handler starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

from consumers.stage import ItemResult, Output, Stage, StageContext, TopicLog
from plumbing.errors import TransientError
from plumbing.settings import Settings
from scene_worker.manifest import is_complete, manifest
from scene_worker.scene_mesh import merged_glb
from scene_worker.state import SceneState
from schemas import SceneViewRecord, parse_event

log = logging.getLogger(__name__)


class SceneStage(Stage[SceneViewRecord]):
    """Publishes one scene-ready event per complete scene (see the module docstring)."""

    name = "scene"
    input_topic = "scene-views"
    #: Each record must see the state the previous one left, its outputs on the topic.
    sequential = True
    #: A view of a deleted request: its state is erased and nothing is published (its
    #: request ended with its asset-ready event; a scene missing a view never completes).
    on_deleted = "drop"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def parse(self, raw: bytes) -> SceneViewRecord:
        return parse_event(raw, SceneViewRecord)

    def batch_key(self, event: SceneViewRecord) -> Hashable | None:
        return None

    def request_id(self, event: SceneViewRecord) -> str | None:
        return event.view.id

    def image_index(self, event: SceneViewRecord) -> int | None:
        return event.view.image_index

    def handle(self, events: list[SceneViewRecord], ctx: StageContext) -> list[ItemResult]:
        results: list[ItemResult] = []
        for index, rec in enumerate(events):
            try:
                with ctx.phase("scene", item=index):
                    results.append(self._one(rec, SceneState(ctx.blob, rec.tenant), ctx))
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
        topic = ctx.topics.scenes
        log_ = _topic_log(ctx)
        since = state.intent(scene_id)
        if since is None:  # the first publish: remember where the topic ended before it
            state.write_intent(scene_id, log_.end_offsets(topic))
            log.info("scene %s complete: %d view images", scene_id, len(records))
            return [self._event(scene_id, records, state, ctx)]
        started = time.monotonic()
        found = log_.find(topic, scene_id, since)
        log.info(
            "scene %s: checked the scenes topic after an unconfirmed publish in %.0f ms: %s",
            scene_id,
            (time.monotonic() - started) * 1000,
            f"found at {found}" if found else "absent, publishing",
        )
        if found is None:
            return [self._event(scene_id, records, state, ctx)]
        state.mark_published(scene_id, *found)
        return []

    def _event(
        self, scene_id: str, records: list[SceneViewRecord], state: SceneState, ctx: StageContext
    ) -> Output:
        """The scene-ready output, after writing the merged scene ``.glb`` (deterministic:
        a second publish writes the same bytes)."""
        mesh = None
        try:
            data = merged_glb(ctx.blob, records)
            if data is not None:
                mesh = state.write_mesh(scene_id, data)
        except TransientError:
            raise  # the store is away: the runtime retries the record
        except Exception:  # the merged mesh is an extra: it must not hold the event back
            log.exception("scene %s: no merged mesh", scene_id)
        return Output(ctx.topics.scenes, manifest(scene_id, records, mesh=mesh), key=scene_id)


def _topic_log(ctx: StageContext) -> TopicLog:
    if ctx.topic_log is None:
        raise RuntimeError("the scene stage needs a runtime that provides StageContext.topic_log")
    return ctx.topic_log
