"""Deleting a request: ``genseg delete``, ``consumers.deletion.delete_request``, the stages'
tombstone check, the seg workers' embeddings, scene state and dead-letter replay.

Against the real broker (the session's tansu), the real directory store and real stages
(tiny models). Nothing sleeps in place of a condition.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from consumers.deletion import ANY_TENANT, delete_request
from consumers.runtime import StageRuntime
from consumers.stage import StageContext
from consumers.tombstones import handle_checked
from genseg.demo import QUICK_JOIN
from genseg.replay import replay_dead_letters
from genseg.workers import build_runtimes, running, runtime_config
from plumbing.blobkeys import blob_key, tombstone_key
from plumbing.blobstore import BlobStore, LocalBlobStore
from plumbing.erasure import delete_request_blobs
from plumbing.images import PNG, encode_png
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from scene_worker import SceneStage
from scene_worker.state import SceneState
from schemas import (
    BlobRef,
    DeadLetterEvent,
    DeletionEvent,
    ImageReadyEvent,
    PromptEvent,
    ResolvedParams,
    SceneView,
    SceneViewRecord,
    SourceInfo,
)
from seg_worker.handler import ForgetDeleted, SegStage
from tests.kafka_utils import TopicReader, eventually
from tests.rel_utils import run_cli, worker_env
from tests.s3_server import MotoServer

TENANT = "acme"


def _keys(store: LocalBlobStore) -> set[str]:
    return {info.key for info in store.list_info()}


def _refs(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Every blob reference in an event, wherever it is."""
    found: list[dict[str, Any]] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if {"uri", "sha256", "bytes"} <= set(value):
                found.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(event)
    return found


# --- the command line --------------------------------------------------------------------


async def test_deleting_an_unknown_id_says_so_and_exits_non_zero(settings: Settings) -> None:
    await ensure_topics(settings)
    env = worker_env(settings)
    result = await run_cli(["delete", "never-submitted"], env)
    assert result.returncode == 1
    assert "no request 'never-submitted'" in result.stderr and "--force" in result.stderr
    store = BlobStore.from_url(settings.blob_url)
    assert not store.exists(tombstone_key("never-submitted")), "nothing written for it"
    bad = await run_cli(["delete", "not/an/id"], env)
    assert bad.returncode == 2 and "not a request id" in bad.stderr


async def test_delete_erases_the_request_and_announces_it(settings: Settings) -> None:
    await ensure_topics(settings)
    store = LocalBlobStore(settings.blob_url)
    mine = [blob_key("r1", 0, "gen", n, tenant=TENANT) for n in ("image.png", "heatmap-0.png")]
    mine.append(blob_key("r1", 0, "seg", "mask-0.png", tenant=TENANT))
    others = [
        blob_key("r1-b", 0, "gen", "image.png", tenant=TENANT),  # shares a name prefix
        blob_key("r1", 0, "gen", "image.png", tenant="other"),  # ids are global: a stray
        blob_key("tenants", 0, "gen", "image.png"),  # an untenanted id named like the root
    ]
    for key in [*mine, *others]:
        store.put(key, b"pixels", PNG)
    others.remove(blob_key("r1", 0, "gen", "image.png", tenant="other"))
    env = worker_env(settings)
    async with TopicReader(settings, "deletions") as reader:
        result = await run_cli(["delete", "r1"], env)
        assert result.returncode == 0, result.stderr
        assert "deleted r1: 4 blobs" in result.stdout
        assert _keys(store) == {*others, tombstone_key("r1")}, "every blob of r1, nothing else"
        tomb = json.loads(store.get_key(tombstone_key("r1"), max_bytes=10_000))
        assert tomb["id"] == "r1" and tomb["tenant"] == TENANT
        # Repeated: not unknown (its tombstone), nothing left to erase, announced again.
        again = await run_cli(["delete", "r1"], env)
        assert again.returncode == 0 and "deleted r1: 0 blobs" in again.stdout
        await reader.until(lambda: len(reader.values("deletions")) == 2)
    first, second = (DeletionEvent.model_validate(v) for v in reader.values("deletions"))
    assert reader.keys("deletions") == ["r1", "r1"]
    assert (first.tenant, first.blobs_deleted, first.bytes_deleted) == (TENANT, 4, 24)
    assert (second.blobs_deleted, second.tenant) == (0, TENANT)


# --- a deletion racing the pipeline ------------------------------------------------------


def _prompt(request_id: str, **options: Any) -> PromptEvent:
    fields: dict[str, Any] = {
        "prompt": "a red circle", "targets": ["circle"], "width": 64, "height": 64, "steps": 4,
        "tenant": TENANT, "segmentation": {"min_confidence": 0.0},
    }  # fmt: skip
    return PromptEvent(id=request_id, **{**fields, **options})


async def _submit(settings: Settings, *events: PromptEvent) -> None:
    async with Publisher(settings) as publisher:
        for event in events:
            await publisher.publish(settings.topics.prompts, event)


def _outcomes(reader: TopicReader, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (topic, value)
        for topic in ("assets", "dlq")
        for key, value in zip(reader.keys(topic), reader.values(topic), strict=True)
        if key == request_id
    ]


def _check_settled(store: LocalBlobStore, reader: TopicReader, gone: str, kept: list[str]) -> None:
    """``gone`` ended once, dead-lettered ``deleted``, and left nothing; ``kept`` lost nothing."""
    [(topic, dead)] = _outcomes(reader, gone)
    assert topic == "dlq" and dead["error"]["type"] == "deleted", dead
    assert dead["value"] == "", "no copy of a deleted request in its dead letter"
    assert dead["tenant"] == TENANT
    assert not [k for k in _keys(store) if f"/{gone}/" in f"/{k}"], "nothing of it is left"
    assert store.exists(tombstone_key(gone))
    for request_id in kept:
        [(topic, asset)] = _outcomes(reader, request_id)
        assert topic == "assets"
        for ref in _refs(asset):
            key = store.key_of(ref["uri"])
            assert key.startswith(f"tenants/{TENANT}/{request_id}/"), key
            assert store.exists(key), f"{request_id} lost {key}"


async def test_a_request_deleted_while_generated_ends_deleted_and_leaves_nothing(
    settings: Settings,
) -> None:
    await ensure_topics(settings)
    store = LocalBlobStore(settings.blob_url)
    runtimes = [
        *build_runtimes("gen", settings, **QUICK_JOIN),
        *build_runtimes("seg", settings, scenes=False, **QUICK_JOIN),
    ]
    topics = ("progress", "images", "assets", "dlq")
    async with running(runtimes), TopicReader(settings, *topics) as reader:
        await _submit(settings, _prompt("gone", steps=60), _prompt("kept-1"))
        # The generator is at work on it (a progress event): delete it now. Nothing is
        # stored yet, so the caller says it knows the request (the gateway's view does).
        await reader.until(lambda: "gone" in reader.keys("progress"), timeout=120)
        event = await delete_request(settings, "gone", tenant=TENANT, force=True)
        assert event is not None and event.tenant == TENANT
        await _submit(settings, _prompt("kept-2"))
        ids = ("gone", "kept-1", "kept-2")
        await reader.until(lambda: all(_outcomes(reader, i) for i in ids), timeout=180)
        # Settled: every record committed, so nothing more of it can come.
        await eventually(lambda: all(rt.in_flight == 0 for rt in runtimes), 60)
    _check_settled(store, reader, "gone", ["kept-1", "kept-2"])


async def test_a_request_deleted_between_generator_and_segmenter_ends_deleted(
    settings: Settings,
) -> None:
    await ensure_topics(settings)
    store = LocalBlobStore(settings.blob_url)
    gen = build_runtimes("gen", settings, **QUICK_JOIN)
    seg = build_runtimes("seg", settings, scenes=False, **QUICK_JOIN)
    async with TopicReader(settings, "images", "assets", "dlq") as reader:
        async with running(gen):
            await _submit(settings, _prompt("gone", num_images=2), _prompt("kept"))
            await reader.until(lambda: reader.keys("images").count("gone") == 2, timeout=120)
        # Its images are made and announced; it is deleted before the segmenter runs.
        event = await delete_request(settings, "gone", tenant=ANY_TENANT)
        assert event is not None and event.blobs_deleted > 0 and event.tenant == TENANT
        async with running(seg):
            await reader.until(
                lambda: len(_outcomes(reader, "gone")) == 2 and _outcomes(reader, "kept"),
                timeout=120,
            )
    dead = [value for _, value in _outcomes(reader, "gone")]
    assert sorted(d["image_index"] for d in dead) == [0, 1], "each image ends once"
    assert {d["error"]["type"] for d in dead} == {"deleted"}
    assert not [k for k in _keys(store) if "/gone/" in f"/{k}"]
    [(topic, _)] = _outcomes(reader, "kept")
    assert topic == "assets"


# --- every seg worker forgets the embeddings ---------------------------------------------


def _image_event(store: BlobStore, request_id: str, seed: int) -> ImageReadyEvent:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    key = blob_key(request_id, 0, "gen", "image.png")
    ref = store.put(key, encode_png(Image.fromarray(pixels)), PNG)
    params = ResolvedParams(
        prompt="x", width=64, height=64, steps=1, guidance_scale=7.5, sampler="ddim", seed=seed
    )
    return ImageReadyEvent(
        id=request_id, image=ref, params=params, model="tiny", targets=["box-0"],
        segmentation={"mode": "boxes", "boxes": [[8, 8, 32, 32]], "min_confidence": 0.0},
    )  # fmt: skip


async def test_every_seg_worker_drops_the_embeddings_of_a_deleted_request(
    settings: Settings,
) -> None:
    await ensure_topics(settings)
    store = BlobStore.from_url(settings.blob_url)
    ctx = StageContext(blob=store, topics=settings.topics, settings=settings)
    deleted, kept = _image_event(store, "emb-gone", 1), _image_event(store, "emb-kept", 2)
    # Two segmenters (two worker processes' worth), each has embedded both images.
    segs = [SegStage(settings), SegStage(settings)]
    for seg in segs:
        assert all(isinstance(r, list) for r in seg.handle([deleted, kept], ctx))
        assert seg.predictor.cache.images_of("emb-gone") == {deleted.image.sha256}
    listeners = [ForgetDeleted(seg) for seg in segs]
    runtimes = []
    for stage in listeners:  # a group each: every one sees every deletion
        group = f"{settings.topic_prefix}.forget-{uuid.uuid4().hex}"
        config = runtime_config(stage, group_id=group, **QUICK_JOIN)
        runtimes.append(StageRuntime(stage, settings, config))
    async with running(runtimes), Publisher(settings) as publisher:
        # They start at the latest offset: wait until both read what is published now.
        probe = DeletionEvent(id="probe", blobs_deleted=0, bytes_deleted=0, deleted_at="now")

        async def heard() -> bool:
            await publisher.publish(settings.topics.deletions, probe)
            return all(stage.handled for stage in listeners)

        for _ in range(600):
            if await heard():
                break
            await asyncio.sleep(0.1)  # between probes: each one is a condition check
        assert all(stage.handled for stage in listeners), "the listeners never joined"
        assert await delete_request(settings, "emb-gone", tenant=None, publisher=publisher)
        await eventually(lambda: all(not s.predictor.cache.images_of("emb-gone") for s in segs), 60)
    for seg in segs:
        assert seg.predictor.cache.images_of("emb-kept") == {kept.image.sha256}, "others stay"
        assert len(seg.predictor.cache) == 1, "only the kept image's embedding is left"


# --- scene state ---------------------------------------------------------------------------


def _view(request_id: str, view: str) -> SceneViewRecord:
    ref = BlobRef(uri=f"file:///x/{view}.png", sha256="0" * 64, media_type=PNG, bytes=1)
    return SceneViewRecord(
        scene_id="hall", views_total=2, num_images=1, tenant=TENANT,
        view=SceneView(view=view, angle=float(view), id=request_id, status="ok", image=ref),
    )  # fmt: skip


def test_a_deleted_scene_view_leaves_no_scene_state(settings: Settings, blob_dir: Path) -> None:
    store = LocalBlobStore(blob_dir)
    ctx = StageContext(blob=store, topics=settings.topics, settings=settings)
    stage = SceneStage(settings)
    first, second = _view("hall.v0", "0"), _view("hall.v90", "90")
    assert handle_checked(stage, [first], ctx) == [[]], "one view of two: not complete"
    state = f"tenants/{TENANT}/_scenes/hall/views/0/0.json"
    assert state in _keys(store), "a tenant's scene state lives under its prefix"
    outcome = delete_request_blobs(store, "hall.v0", tenant=TENANT)
    assert outcome is not None and state in outcome.erased.keys
    assert _keys(store) == {tombstone_key("hall.v0")}
    # The deleted view comes again (a redelivery, or a record already on its way): its
    # state is erased again and nothing is published; the scene never completes.
    assert handle_checked(stage, [first], ctx) == [[]]
    assert handle_checked(stage, [second], ctx) == [[]]
    assert state not in _keys(store)
    assert any(k.startswith(f"tenants/{TENANT}/_scenes/hall/views/90/") for k in _keys(store))


# --- dead-letter replay --------------------------------------------------------------------


async def test_replay_keeps_the_tenant_and_skips_deleted_requests(settings: Settings) -> None:
    await ensure_topics(settings)
    failed = _prompt("failed-1").to_json_bytes()
    source = SourceInfo(topic=settings.topics.prompts, partition=0, offset=0)
    letters = [
        DeadLetterEvent.build(stage="gen", error_type="timeout", message="slow", attempts=3,
                              source=source, raw=failed, request_id="failed-1", tenant=TENANT),
        DeadLetterEvent.build(stage="seg", error_type="deleted", message="deleted",
                              attempts=1, source=source.model_copy(update={"offset": 1}),
                              raw=b"", request_id="gone-1", tenant=TENANT),
    ]  # fmt: skip
    async with Publisher(settings) as publisher:
        for letter in letters:
            await publisher.publish(settings.topics.dlq, letter)
    report = await replay_dead_letters(settings)
    assert report.replayed == 1 and report.skipped == 1
    assert any("gone-1" in line and "deleted" in line for line in report.lines)
    async with TopicReader(settings, "prompts") as reader:
        await reader.until(lambda: reader.keys("prompts") == ["failed-1"])
    assert reader.values("prompts")[0]["tenant"] == TENANT


# --- on S3 ----------------------------------------------------------------------------------


def test_deletion_on_s3_erases_the_request_and_its_scene_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with MotoServer() as moto:
        for name, value in moto.obstore_env().items():
            monkeypatch.setenv(name, value)
        store = BlobStore.from_url(f"s3://{moto.create_bucket('del')}/blobs")
        outputs = [blob_key("v0", 0, "gen", "image.png", tenant=TENANT)]
        others = [
            blob_key("v1", 0, "gen", "image.png", tenant=TENANT),
            blob_key("v0x", 0, "gen", "image.png"),
        ]
        for key in [*outputs, *others]:
            store.put(key, b"pixels", PNG)
        SceneState(store, TENANT).record_view(_view("v0", "0"))
        SceneState(store, TENANT).record_view(_view("v1", "90"))
        before = {i.key for i in store.list_info()}
        outcome = delete_request_blobs(store, "v0")  # the tenant found by looking
        assert outcome is not None and outcome.tenant == TENANT
        mine = {k for k in before if "/v0/" in f"/{k}" or k.endswith("/views/0/0.json")}
        assert len(mine) == 3 and set(outcome.erased.keys) == mine
        assert {i.key for i in store.list_info()} == (before - mine) | {tombstone_key("v0")}
