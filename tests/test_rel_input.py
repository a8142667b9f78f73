"""Reliability: bad and hostile input never crashes a worker; each is dead-lettered with a reason.

One gen and one seg worker process (tiny models) serve the whole module:

- thousands of malformed records, drawn from hypothesis strategies, published in bulk to
  the prompts topic with good requests interleaved: every bad record gets its own
  dead-letter event (matched by source partition and offset) with a reason, every good
  request completes, no worker restarts;
- hostile blob references (``../``, encoded traversal, absolute paths, other schemes and
  buckets, a symlink out of the store, sha256 and size lies, a missing blob, a
  20,000 x 20,000 PNG, a truncated PNG, text posing as an image) in image-ready events
  (seg worker) and in inpaint events (gen worker): each is refused, at the first
  attempt, with a dead-letter event that says why.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image

from plumbing.blobstore import BlobStore, LocalBlobStore, sha256_hex
from plumbing.broker import EmbeddedBroker
from plumbing.images import encode_heatmap, encode_png
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import (
    BlobRef,
    ImageReadyEvent,
    InpaintEvent,
    InvalidEvent,
    PromptEvent,
    ResolvedParams,
    SegmentationOptions,
    parse_prompts_record,
)
from tests.rel_utils import Ledger, WorkerProcess, huge_png, record_figures, worker_env

BAD_RECORDS = 3000
GOOD_RECORDS = 30
_prefixes = itertools.count()


@dataclass
class Pipeline:
    settings: Settings
    store: LocalBlobStore
    gen: WorkerProcess
    seg: WorkerProcess


@pytest.fixture(scope="module")
def pipeline(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("rel-input")
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"input{os.getpid()}-{next(_prefixes)}",
        blob_url=str(root / "blobs"),
        models="tiny",
    )
    asyncio.run(ensure_topics(settings, partitions=4))
    env = worker_env(settings)
    gen = WorkerProcess("gen", env, root)
    seg = WorkerProcess("seg", env, root)
    gen.start()
    seg.start()
    try:
        deadline = time.monotonic() + 120
        for worker, stage in ((gen, "gen"), (seg, "seg")):
            while worker.count(f"stage {stage} assigned [") == 0:
                worker.check_alive()
                assert time.monotonic() < deadline, f"{stage} never joined: {worker.log()}"
                time.sleep(0.1)  # poll interval while the worker starts
        store = BlobStore.from_url(settings.blob_url)
        assert isinstance(store, LocalBlobStore)
        yield Pipeline(settings, store, gen, seg)
    finally:
        gen.stop(15)
        seg.stop(15)


def good_prompt(request_id: str, n: int) -> PromptEvent:
    return PromptEvent(
        id=request_id,
        prompt=f"a cup on a table {n}",
        targets=["cup"],
        width=64,
        height=64,
        steps=1 + n % 2,
        seed=n,
        segmentation=SegmentationOptions(min_confidence=0.0),
    )


# --- malformed records, from hypothesis ------------------------------------------------------

BASE = {"id": "fuzz", "prompt": "a cup", "width": 64, "height": 64, "steps": 1, "seed": 1}
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
INVALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(
        st.just(""),
        st.text(min_size=129, max_size=200, alphabet="abc"),
        st.text(min_size=1, max_size=20).filter(lambda s: any(c in s for c in " /?#\\\x00é")),
        st.sampled_from(["../../etc/passwd", "a b", "id\n", "ü"]),
        st.integers(),
        st.lists(st.text(max_size=3), max_size=3),
    ),
    "prompt": st.one_of(st.just(""), st.text(min_size=2001, max_size=2100), st.integers()),
    "width": st.one_of(
        st.integers(max_value=63),
        st.integers(min_value=2049),
        st.integers(65, 2047).filter(lambda v: v % 8),
    ),
    "height": st.one_of(st.integers(max_value=63), st.text(max_size=5), st.floats(64.1, 100)),
    "steps": st.one_of(st.integers(max_value=0), st.integers(min_value=151), st.just("many")),
    "sampler": st.text(max_size=20).filter(
        lambda s: s not in {"dpmpp_2m", "dpmpp_2m_karras", "euler_a", "ddim", "unipc"}
    ),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
    "num_images": st.one_of(st.integers(max_value=0), st.integers(min_value=9)),
    "guidance_scale": st.one_of(
        st.floats(min_value=30.01, allow_infinity=False),
        st.floats(max_value=-0.01, allow_infinity=False),
    ),
    "targets": st.one_of(
        st.lists(st.just("cup"), min_size=11, max_size=14),
        st.just([""]),
        st.just("cup"),
        st.just([1]),
    ),
    "segmentation": st.one_of(
        st.fixed_dictionaries(
            {
                "mode": st.text(max_size=10).filter(
                    lambda s: s not in {"attention", "boxes", "points", "auto"}
                )
            }
        ),
        st.just({"mode": "boxes"}),
        st.fixed_dictionaries({"min_confidence": st.floats(1.01, 10)}),
        st.just({"boxes": [[0, 0, -1, 5]], "mode": "boxes"}),
    ),
    "schema": st.one_of(
        st.text(max_size=30).filter(lambda s: s not in {"genseg.prompt/v1"}),
        st.integers(),
    ),
}


@st.composite
def mutated_prompt(draw: st.DrawFn) -> bytes:
    """A valid tiny prompt with one to three fields made invalid (or removed)."""
    data = dict(BASE)
    for name in draw(st.lists(st.sampled_from(sorted(INVALID_FIELDS)), min_size=1, max_size=3)):
        data[name] = draw(INVALID_FIELDS[name])
    if draw(st.booleans()):
        data.pop(draw(st.sampled_from(["id", "prompt"])))
    return json.dumps(data).encode()


def special_values() -> st.SearchStrategy[bytes]:
    """Inputs that break naive parsers: NaN, deep nesting, huge numbers, bad UTF-8, BOMs."""
    return st.sampled_from(
        [
            b'{"id": "nan", "prompt": "x", "guidance_scale": NaN}',
            b'{"id": "inf", "prompt": "x", "guidance_scale": Infinity}',
            b"[" * 50_000 + b"]" * 50_000,
            b'{"id": "deep", "prompt": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
            b'{"id": "bigint", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
            b'{"id": "utf8", "prompt": "\xc3\x28"}',
            b"\xef\xbb\xbf" + json.dumps(BASE).encode(),
            b"",
            b"null",
            b"\x00" * 64,
            b'{"id": "dup", "prompt": "x", "width": 64, "width": 65}',
            b'{"schema": "genseg.inpaint/v1", "id": "noimg", "prompt": "x"}',
            json.dumps({**BASE, "id": "x" * 100_000}).encode(),
        ]
    )


bad_values = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(
        lambda d: json.dumps(d).encode()
    ),
    mutated_prompt(),
    mutated_prompt(),
    mutated_prompt(),
    special_values(),
)
bad_keys = st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40).map(str.encode))
bad_headers = st.lists(
    st.tuples(
        st.sampled_from(["traceparent", "tracestate", "x-junk", ""]),
        st.one_of(
            st.binary(max_size=60),
            st.just(b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"),
            st.just(b"ff-zz"),
        ),
    ),
    max_size=3,
)


@dataclass
class BadRecord:
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


def draw_bad_records(n: int) -> list[BadRecord]:
    """``n`` records drawn from the strategies above (reproducibly), each one refused by the
    contract's parser (checked here, so a record that happens to be valid, and would be a
    real generation job, never slips in)."""
    drawn: list[BadRecord] = []

    @hsettings(
        max_examples=n,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(bad_values, bad_keys, bad_headers)
    def collect(value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        drawn.append(BadRecord(value, key, headers))

    collect()
    refused = []
    for record in drawn:
        try:
            parse_prompts_record(record.value)
        except InvalidEvent:
            refused.append(record)
    return refused


@pytest.mark.slow
async def test_fuzzed_bad_records_are_each_dead_lettered_and_good_ones_complete(
    pipeline: Pipeline,
) -> None:
    settings = pipeline.settings
    drawn_at = time.monotonic()
    bad = draw_bad_records(BAD_RECORDS)
    drawing_s = time.monotonic() - drawn_at
    assert len(bad) >= BAD_RECORDS * 0.9, f"only {len(bad)} invalid records drawn"
    good = [good_prompt(f"good-{i:02d}", i) for i in range(GOOD_RECORDS)]
    order: list[BadRecord | PromptEvent] = list(bad)
    for k, event in enumerate(good):  # spread evenly among the bad ones
        order.insert((k + 1) * len(order) // (GOOD_RECORDS + 1), event)
    assert sum(isinstance(r, PromptEvent) for r in order) == GOOD_RECORDS

    started = time.monotonic()
    sources: dict[tuple[int, int], BadRecord] = {}
    async with Publisher(settings) as pub:
        futures = []
        for record in order:
            if isinstance(record, PromptEvent):
                futures.append(
                    await pub.send(
                        settings.topics.prompts, record.to_json_bytes(), key=record.id, headers=[]
                    )
                )
            else:
                futures.append(
                    await pub.producer.send(
                        settings.topics.prompts,
                        value=record.value,
                        key=record.key,
                        headers=record.headers,
                    )
                )
        metadata = await asyncio.gather(*futures)
    for record, meta in zip(order, metadata, strict=True):
        if isinstance(record, BadRecord):
            sources[(meta.partition, meta.offset)] = record

    def dead_sources(ledger: Ledger) -> Counter[tuple[int, int]]:
        return Counter(
            (d["source"]["partition"], d["source"]["offset"])
            for d in ledger.values("dlq")
            if d["source"]["topic"] == settings.topics.prompts
        )

    async with Ledger(settings) as ledger:
        await ledger.until(
            lambda: len(dead_sources(ledger)) >= len(sources) and ledger.done(g.id for g in good),
            timeout=300,
        )
        elapsed = time.monotonic() - started
        dead = [d for d in ledger.values("dlq") if d["source"]["topic"] == settings.topics.prompts]
        counts = dead_sources(ledger)
        assets = set(ledger.keys("assets"))
    pipeline.gen.check_alive()
    pipeline.seg.check_alive()
    error_types = Counter(d["error"]["type"] for d in dead)
    record_figures(
        "fuzz",
        bad_records=len(bad),
        good_records=GOOD_RECORDS,
        drawing_s=round(drawing_s, 1),
        seconds=round(elapsed, 1),
        dead_letters=len(dead),
        error_types=dict(error_types),
        good_completed=len({g.id for g in good} & assets),
        worker_restarts=pipeline.gen.starts + pipeline.seg.starts - 2,
    )
    assert set(counts) == set(sources), "every bad record, and only those, dead-lettered"
    assert max(counts.values()) == 1, "each exactly once (no worker restarted)"
    for d in dead:
        assert d["stage"] == "gen" and d["attempts"] <= 1, d
        assert d["error"]["type"] == "validation", d
        assert len(d["error"]["message"]) > 10, d
        record = sources[(d["source"]["partition"], d["source"]["offset"])]
        text = record.value.decode("utf-8", "replace")
        if not d.get("value_truncated"):
            assert d["value"] == text, "the original value travels with its dead letter"
    assert {g.id for g in good} <= assets, "good requests interleaved with bad ones complete"
    assert pipeline.gen.starts == pipeline.seg.starts == 1


# --- hostile references -----------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    return encode_png(image)


def fake_ref(uri: str, data: bytes = b"x") -> BlobRef:
    return BlobRef(uri=uri, sha256=sha256_hex(data), media_type="image/png", bytes=len(data))


def hostile_refs(store: LocalBlobStore, root: Path) -> dict[str, tuple[BlobRef, tuple[str, ...]]]:
    """name -> (reference, phrases one of which the dead letter's message must contain)."""
    good = png(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)))
    real = store.put("hostile/real/image.png", good, "image/png")
    outside = root / "outside.png"
    outside.write_bytes(good)
    link_dir = store.root / "hostile" / "link"
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "image.png").symlink_to(outside)
    big = huge_png(20_000, 20_000)
    truncated = good[: len(good) // 2]
    foreign = ("not in the store", "outside the store", "escapes the store", "unsafe blob key")
    integrity = ("does not match its reference",)
    return {
        "dotdot": (fake_ref(f"{store.url}/../../../../etc/passwd"), foreign),
        "encoded-dotdot": (fake_ref(f"{store.url}/%2E%2E/%2E%2E/%2E%2E/etc/passwd"), foreign),
        "absolute-path": (fake_ref("/etc/passwd"), foreign),
        "file-outside": (fake_ref(outside.as_uri(), good), foreign),
        "http-scheme": (fake_ref("http://169.254.169.254/latest/meta-data/iam"), foreign),
        "other-bucket": (fake_ref("s3://someone-elses-bucket/secret.png"), foreign),
        "query": (fake_ref(real.uri + "?versionId=1", good), foreign),
        "symlink-escape": (fake_ref(store.uri_for("hostile/link/image.png"), good), foreign),
        "sha256-mismatch": (real.model_copy(update={"sha256": "0" * 64}), integrity),
        "size-lie": (
            real.model_copy(update={"bytes": 10, "sha256": sha256_hex(good[:10])}),
            integrity,
        ),
        "missing": (fake_ref(store.uri_for("hostile/missing/image.png")), ("no blob at",)),
        "size-claim-1TB": (
            real.model_copy(update={"bytes": 10**12}),
            ("limit", "does not match its reference"),
        ),
        "20000x20000-png": (
            store.put("hostile/huge/image.png", big, "image/png"),
            ("20000x20000 pixels exceeds the limit", "decompression bomb"),
        ),
        "truncated-png": (
            store.put("hostile/truncated/image.png", truncated, "image/png"),
            ("could not be decoded",),
        ),
        "not-an-image": (
            store.put("hostile/text/image.png", b"#!/bin/sh\nrm -rf /\n", "image/png"),
            ("could not be decoded",),
        ),
    }


SEG_ERROR_TYPES = {
    "foreign_blob_ref",
    "blob_integrity",
    "blob_not_found",
    "blob_too_large",
    "invalid_image",
}
GEN_ERROR_TYPES = SEG_ERROR_TYPES  # one naming: the blob errors' own error_type


def image_ready(request_id: str, image: BlobRef, heatmap: BlobRef) -> ImageReadyEvent:
    return ImageReadyEvent(
        id=request_id,
        image=image,
        params=ResolvedParams(
            prompt="a cup",
            width=64,
            height=64,
            steps=1,
            guidance_scale=7.5,
            sampler="dpmpp_2m",
            seed=1,
        ),
        model="tiny",
        heatmaps={"cup": heatmap},
        targets=["cup"],
        segmentation=SegmentationOptions(min_confidence=0.0),
    )


@pytest.mark.slow
async def test_hostile_references_are_refused_with_a_reason_by_both_workers(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    settings, store = pipeline.settings, pipeline.store
    cases = hostile_refs(store, tmp_path)
    good_png = png(Image.fromarray(np.full((64, 64, 3), 120, np.uint8)))
    good_image = store.put("hostile/good/image.png", good_png, "image/png")
    heat = np.zeros((8, 8), np.float32)
    heat[2:5, 2:5] = 1.0
    good_heat = store.put("hostile/good/heat.png", encode_heatmap(heat), "image/png")
    good_mask = store.put("hostile/good/mask.png", png(Image.new("L", (64, 64), 255)), "image/png")
    seg_events = {
        f"seg-{name}": image_ready(f"seg-{name}", ref, good_heat)
        for name, (ref, _) in cases.items()
    }
    seg_events["seg-heatmap-dotdot"] = image_ready(
        "seg-heatmap-dotdot", good_image, cases["dotdot"][0]
    )
    seg_events["seg-control"] = image_ready("seg-control", good_image, good_heat)
    gen_events = {
        f"gen-{name}": InpaintEvent(
            id=f"gen-{name}",
            prompt="a red apple",
            width=64,
            height=64,
            steps=1,
            seed=3,
            image=ref,
            mask=good_mask,
        )
        for name, (ref, _) in cases.items()
    }
    gen_events["gen-mask-dotdot"] = InpaintEvent(
        id="gen-mask-dotdot",
        prompt="a red apple",
        width=64,
        height=64,
        steps=1,
        seed=3,
        image=good_image,
        mask=cases["dotdot"][0],
    )
    gen_events["gen-control"] = InpaintEvent(
        id="gen-control",
        prompt="a red apple",
        width=64,
        height=64,
        steps=1,
        seed=3,
        image=good_image,
        mask=good_mask,
        segmentation=SegmentationOptions(min_confidence=0.0),
    )
    phrases = {f"seg-{n}": p for n, (_, p) in cases.items()} | {
        f"gen-{n}": p for n, (_, p) in cases.items()
    }
    phrases["seg-heatmap-dotdot"] = phrases["gen-mask-dotdot"] = cases["dotdot"][1]
    hostile_ids = sorted((set(seg_events) | set(gen_events)) - {"seg-control", "gen-control"})
    started = time.monotonic()
    async with Publisher(settings) as pub:
        for event in seg_events.values():
            await pub.publish(settings.topics.images, event)
        for event in gen_events.values():
            await pub.publish(settings.topics.prompts, event)
    async with Ledger(settings) as ledger:
        everything = [*hostile_ids, "seg-control", "gen-control"]
        await ledger.until_done(everything, timeout=180)
        elapsed = time.monotonic() - started
        dead = {d["id"]: d for d in ledger.values("dlq") if d.get("id") in set(hostile_ids)}
        assets = set(ledger.keys("assets"))
        images = set(ledger.keys("images"))
    pipeline.gen.check_alive()
    pipeline.seg.check_alive()
    record_figures(
        "hostile_references",
        cases=len(cases),
        refused_by_seg=sum(1 for i in dead if i.startswith("seg-")),
        refused_by_gen=sum(1 for i in dead if i.startswith("gen-")),
        error_types=dict(Counter(d["error"]["type"] for d in dead.values())),
        seconds=round(elapsed, 1),
        examples={
            i: f"{d['error']['type']}: {d['error']['message'][:160]}"
            for i, d in sorted(dead.items())
        },
    )
    assert "seg-control" in assets and "gen-control" in assets, "sound references still work"
    assert sorted(dead) == hostile_ids, "every hostile reference dead-lettered"
    for request_id, d in dead.items():
        stage = request_id.split("-")[0]
        assert d["stage"] == stage, d
        assert d["attempts"] == 1, f"refused at once, never retried: {d}"
        wanted = SEG_ERROR_TYPES if stage == "seg" else GEN_ERROR_TYPES
        assert d["error"]["type"] in wanted, d
        assert any(p in d["error"]["message"] for p in phrases[request_id]), (
            phrases[request_id],
            d,
        )
    assert not set(hostile_ids) & assets, "no asset for a hostile reference"
    assert not {i for i in hostile_ids if i.startswith("gen-")} & images, "nor an image"
    assert pipeline.gen.starts == pipeline.seg.starts == 1
