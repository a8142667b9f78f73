"""End to end: the real CLI's gen and seg workers as separate processes, one broker, one trace.

A module-scoped pipeline: the session's tansu broker, topics created with
``genseg topics create``, ``genseg worker gen`` and ``genseg worker seg`` started
as processes (tiny models, one torch thread each) exporting spans over OTLP/HTTP
to a receiver in this process (:mod:`tests.otlp_receiver`) and serving
Prometheus metrics. Upstream is played by a plain aiokafka producer sending raw
JSON with W3C ``traceparent`` headers, as a system outside this repository would.
The tests run in file order; the last one stops the workers with SIGTERM.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from plumbing.blobstore import BlobStore, blob_key, sha256_hex
from plumbing.broker import EmbeddedBroker
from plumbing.images import encode_heatmap, encode_png
from plumbing.settings import Settings
from schemas import (
    SCHEMA_PROMPT,
    AssetReadyEvent,
    BlobRef,
    ImageReadyEvent,
    ResolvedParams,
    SegmentationOptions,
)
from tests import forkserver
from tests.kafka_utils import TopicReader
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.timeout(420)

ROOT = Path(__file__).resolve().parent.parent
GEN_PHASES = {"text_encode", "denoise", "decode", "blob_write"}
SEG_PHASES = {"decode_image", "prompts", "embed", "predict", "assets", "blob_write"}
#: Generous: this machine has two cores, shared by both workers and the broker.
STARTUP_S = 180.0
OUTCOME_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 100 ms (blocking); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        time.sleep(0.1)


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what}")
        await asyncio.sleep(0.1)


@dataclass
class Worker:
    kind: str
    proc: forkserver.Process
    log_path: Path
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """True while running; fails the test at once (with its log) if the worker died."""
        assert self.proc.poll() is None, f"{self.kind} worker exited:\n{self.log()[-4000:]}"
        return True

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Sample name -> [(labels, value)] of the worker's /metrics."""
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    def metrics_up(self) -> bool:
        self.alive()
        try:
            self.scrape()
        except OSError:
            return False
        return True


@dataclass
class Pipeline:
    settings: Settings
    env: dict[str, str]
    receiver: OtlpReceiver
    gen: Worker
    seg: Worker

    @property
    def workers(self) -> tuple[Worker, Worker]:
        return self.gen, self.seg

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``genseg ARGS`` as a process with the pipeline's environment."""
        return forkserver.run(
            [sys.executable, "-m", "genseg.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def start_worker(kind: str, env: dict[str, str], log_dir: Path, *extra: str) -> Worker:
    port = free_port()
    log_path = log_dir / f"{kind}.log"
    command = [
        sys.executable, "-m", "genseg.cli", "worker", kind, "--metrics-port", str(port),
        "--torch-threads", "1", "--no-create-topics", "--drain-timeout", "60", *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = forkserver.popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return Worker(kind, proc, log_path, port)


@pytest.fixture(scope="module")
def pipeline(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("e2e")
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"e2e{os.getpid()}",
        blob_url=str(tmp / "blobs"),
        models="tiny",
    )
    with OtlpReceiver() as receiver:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OTEL_", "GENSEG_", "KAFKA_", "SD_", "SAM_"))
        }
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
            GENSEG_TOPIC_PREFIX=settings.topic_prefix,
            GENSEG_BLOB_URL=settings.blob_url,
            GENSEG_MODELS="tiny",
            GENSEG_LOG_LEVEL="INFO",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="200",
            NO_PROXY="127.0.0.1,localhost",
            COLUMNS="300",  # rich wraps at 80 columns when not on a terminal
            PYTHONUNBUFFERED="1",
        )
        pipe = Pipeline(settings, env, receiver, gen=None, seg=None)  # type: ignore[arg-type]
        created = pipe.cli("topics", "create", "--partitions", "4")
        assert created.returncode == 0, created.stderr
        assert f"{settings.topics.prompts}: created" in created.stdout, created.stdout
        pipe.gen = start_worker("gen", env, tmp, "--max-batch", "4", "--max-wait-ms", "50")
        pipe.seg = start_worker("seg", env, tmp)
        try:
            for worker in pipe.workers:
                wait_until(worker.metrics_up, STARTUP_S, f"{worker.kind} serves /metrics")
                wait_until(
                    lambda w=worker: w.alive() and f"stage {w.kind} assigned [" in w.log(),
                    STARTUP_S,
                    f"{worker.kind} joined its group",
                )
            yield pipe
        finally:
            for worker in pipe.workers:
                if worker.proc.poll() is None:
                    worker.proc.terminate()
            for worker in pipe.workers:
                try:
                    worker.proc.wait(60)
                except subprocess.TimeoutExpired:
                    worker.proc.kill()
                    worker.proc.wait()


def traceparent() -> tuple[str, str, bytes]:
    """A fresh (trace id, parent span id, ``traceparent`` header value), as upstream makes."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01".encode()


async def produce_raw(
    settings: Settings, topic: str, records: list[tuple[str, dict[str, Any], bytes]]
) -> None:
    """Send ``(key, JSON value, traceparent)`` records with a plain aiokafka producer."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                value=json.dumps(value).encode(),
                key=key.encode(),
                headers=[("traceparent", header)],
            )
            for key, value, header in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def tree_problems(spans: list[ReceivedSpan], upstream_span_id: str) -> list[str]:
    """Why ``spans`` (one trace) are not one tree hanging off ``upstream_span_id``."""
    by_id = {s.span_id: s for s in spans}
    problems = []
    if len(by_id) != len(spans):
        problems.append("duplicate span ids")
    roots = [s for s in spans if s.parent_span_id not in by_id]
    if len(roots) != 1:
        problems.append(f"{len(roots)} roots: {[(r.name, r.parent_span_id) for r in roots]}")
    elif roots[0].parent_span_id != upstream_span_id:
        problems.append(f"root {roots[0].name} hangs off {roots[0].parent_span_id}")
    return problems


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_span_id in by_id and len(chain) < 64:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


def trace_complete(spans: list[ReceivedSpan], prompts: str, images: str) -> bool:
    names = {(s.service_name, s.name) for s in spans}
    return (
        {("genseg-gen", f"process {prompts}"), ("genseg-seg", f"process {images}")}
        | {("genseg-gen", p) for p in GEN_PHASES}
        | {("genseg-seg", p) for p in SEG_PHASES}
    ) <= names


async def test_ten_traced_prompts_become_rgba_assets_in_one_trace_each(
    pipeline: Pipeline,
) -> None:
    settings, receiver = pipeline.settings, pipeline.receiver
    topics = settings.topics
    ids = [f"e2e-{i}" for i in range(10)]
    upstream = {i: traceparent() for i in ids}
    records = []
    for n, request_id in enumerate(ids):
        value: dict[str, Any] = {
            "id": request_id,
            "prompt": f"a cup on a wooden table, photo {n}",
            "targets": ["cup"],
            "width": 64,
            "height": 64,
            "steps": 4,
            "seed": 100 + n,
            # Tiny SAM's random IoU head scores about 0.2 and its masks are speckled
            # (smoothing would erase them): keep every mask as SAM made it.
            "segmentation": {"min_confidence": 0.0, "smooth_px": 0},
            "upstream_only_field": {"ignored": True},  # forward compatibility
        }
        if n % 2 == 0:  # without "schema", a prompts record is read as a prompt event
            value["schema"] = SCHEMA_PROMPT
        records.append((request_id, value, upstream[request_id][2]))

    async with TopicReader(settings, "assets", "dlq") as reader:

        def all_assets() -> bool:
            dead = [d for d in reader.values("dlq") if d.get("id") in upstream]
            assert not dead, f"dead-lettered: {dead}"
            return set(ids) <= set(reader.keys("assets"))

        await produce_raw(settings, topics.prompts, records)
        await reader.until(all_assets, timeout=OUTCOME_S)

        # Metrics, scraped while the workers run. A worker counts a record as processed
        # once the broker acknowledged its outputs, which may be just after we read them.
        for worker in pipeline.workers:
            await eventually(
                lambda w=worker: (
                    w.alive() and w.samples()["genseg_records_processed_total"][0][1] >= 10
                ),
                30,
                f"{worker.kind} counted 10 records processed",
            )
            samples = worker.samples()
            stage = {"stage": worker.kind}
            processed = [v for labels, v in samples["genseg_records_processed_total"]]
            assert processed and processed[0] >= 10, (worker.kind, processed)
            assert [labels for labels, _ in samples["genseg_records_processed_total"]] == [stage]
            buckets = samples["genseg_stage_latency_seconds_bucket"]
            assert len(buckets) > 5 and max(v for _, v in buckets) >= 10
            assert samples["genseg_stage_latency_seconds_count"][0][1] >= 10
            assert samples["genseg_batch_size_bucket"]
            batch_count = samples["genseg_batch_size_count"][0][1]
            batch_sum = samples["genseg_batch_size_sum"][0][1]
            assert batch_count >= 1 and batch_sum >= 10, (batch_count, batch_sum)
            assert samples["genseg_records_dead_lettered_total"][0][1] == 0
        # The lag gauge is refreshed every few seconds; it reaches 0 once commits land.
        for worker, topic in ((pipeline.gen, topics.prompts), (pipeline.seg, topics.images)):

            def caught_up(w: Worker = worker, t: str = topic) -> bool:
                lag = [
                    (labels["partition"], v)
                    for labels, v in w.samples().get("genseg_consumer_lag", [])
                    if labels.get("topic") == t
                ]
                return len(lag) == 4 and sum(v for _, v in lag) == 0

            await eventually(caught_up, 60, f"{worker.kind} consumer lag 0 on 4 partitions")

    # One asset-ready event per id (a redelivery may repeat one: dedupe by id).
    store = BlobStore.from_url(settings.blob_url)
    outcomes = {}
    for value in reader.values("assets"):
        event = AssetReadyEvent.model_validate(value)
        outcomes.setdefault(event.id, event)
    assert sorted(outcomes) == sorted(ids)
    for request_id, event in outcomes.items():
        assert event.status == "ok" and event.assets, (request_id, event.status)
        image = Image.open(io.BytesIO(store.get(event.image)))
        assert image.size == (64, 64)
        for item in event.assets:
            asset = Image.open(io.BytesIO(store.get(item.asset)))
            asset.load()
            assert asset.mode == "RGBA" and asset.format == "PNG"
            assert 0 < asset.width <= 64 and 0 < asset.height <= 64
        assert {"gen.denoise", "seg.embed"} <= set(event.timings_ms)

    # Traces: every request is one tree, from the upstream span to the seg phases.
    spans = await asyncio.to_thread(
        receiver.wait_for,
        lambda got: all(
            trace_complete(
                [s for s in got if s.trace_id == trace_id], topics.prompts, topics.images
            )
            for trace_id, _, _ in upstream.values()
        ),
        60,
        "every request's gen and seg spans",
    )
    assert not receiver.errors
    process_ids = set()
    for request_id, (trace_id, upstream_span, _) in upstream.items():
        trace = [s for s in spans if s.trace_id == trace_id]
        assert not tree_problems(trace, upstream_span), (request_id, tree_problems(trace, ""))
        by_id = {s.span_id: s for s in trace}
        gen_process = [s for s in trace if s.name == f"process {topics.prompts}"]
        seg_process = [s for s in trace if s.name == f"process {topics.images}"]
        assert {s.service_name for s in gen_process} == {"genseg-gen"}
        assert {s.service_name for s in seg_process} == {"genseg-seg"}
        assert {s.service_name for s in trace} == {"genseg-gen", "genseg-seg"}
        for span in gen_process:
            assert span.attributes["messaging.kafka.message.key"] == request_id
            assert span.kind == 5  # CONSUMER (OTLP's SpanKind numbering)
            process_ids.add(span.span_id)
        for span in seg_process:  # the image-ready record carried the gen span's context
            assert set(map(id, ancestors(span, by_id))) & set(map(id, gen_process))
        for span in trace:
            if span.service_name == "genseg-gen" and span.name in GEN_PHASES:
                assert set(map(id, ancestors(span, by_id))) & set(map(id, gen_process))
            if span.service_name == "genseg-seg" and span.name in SEG_PHASES:
                assert set(map(id, ancestors(span, by_id))) & set(map(id, seg_process))
    # Batch spans live in traces of their own and link the gen process spans they served.
    batches = [s for s in spans if s.name == "batch gen"]
    for batch in batches:
        linked = {span_id for _, span_id in batch.links}
        assert len(linked) == batch.attributes["genseg.batch.size"] > 1
        assert linked <= process_ids
        assert batch.trace_id not in {trace_id for trace_id, _, _ in upstream.values()}


def test_submit_wait_prints_the_outcome(pipeline: Pipeline) -> None:
    done = pipeline.cli(
        "submit", "a cup on a table", "--target", "cup", "--id", "e2e-submit",
        "--width", "64", "--height", "64", "--steps", "4", "--seed", "5",
        "--wait", "--timeout", str(OUTCOME_S),
        timeout=OUTCOME_S + 60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted e2e-submit" in done.stdout
    # The contract's default min_confidence (0.8) is above what tiny SAM scores: no_match.
    line = next(x for x in done.stdout.splitlines() if x.startswith("image 0:"))
    assert line.split()[2] in ("ok", "no_match"), line
    image_key = blob_key("e2e-submit", 0, "gen", "image.png")
    assert line.split()[-1] == BlobStore.from_url(pipeline.settings.blob_url).uri_for(image_key)


async def test_dead_letter_replayed_after_its_blob_appears(pipeline: Pipeline) -> None:
    settings, receiver = pipeline.settings, pipeline.receiver
    store = BlobStore.from_url(settings.blob_url)
    request_id = "e2e-dlq"
    pixels = np.full((64, 64, 3), 70, np.uint8)
    pixels[8:40, 12:44] = (210, 40, 30)
    png = encode_png(Image.fromarray(pixels))
    key = blob_key(request_id, 0, "upstream", "image.png")
    # The reference names a blob that is not written yet: BlobNotFound, permanent.
    ref = BlobRef(
        uri=store.uri_for(key), sha256=sha256_hex(png), media_type="image/png", bytes=len(png)
    )
    heat = np.zeros((8, 8), np.float32)
    heat[1:5, 1:6] = 1.0
    heat_key = blob_key(request_id, 0, "upstream", "heat.png")
    heat_ref = store.put(heat_key, encode_heatmap(heat), "image/png")
    event = ImageReadyEvent(
        id=request_id,
        image=ref,
        params=ResolvedParams(
            prompt="a red cup",
            width=64,
            height=64,
            steps=4,
            guidance_scale=7.5,
            sampler="dpmpp_2m",
            seed=1,
        ),
        model="upstream",
        heatmaps={"cup": heat_ref},
        targets=["cup"],
        segmentation=SegmentationOptions(min_confidence=0.0, smooth_px=0),
    )
    trace_id, upstream_span, header = traceparent()
    async with TopicReader(settings, "assets", "dlq") as reader:
        value = json.loads(event.to_json_bytes())
        await produce_raw(settings, settings.topics.images, [(request_id, value, header)])
        await reader.until(lambda: request_id in reader.keys("dlq"), timeout=OUTCOME_S)
        (dead,) = [d for d in reader.values("dlq") if d["id"] == request_id]
        assert dead["stage"] == "seg" and dead["error"]["type"] == "blob_not_found", dead
        assert dead["attempts"] == 1 and dead["source"]["topic"] == settings.topics.images

        assert store.put(key, png, "image/png") == ref  # the blob appears, at that exact key
        replay = await asyncio.to_thread(pipeline.cli, "dlq", "replay", "--id", request_id)
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "replayed 1, skipped 0" in replay.stdout, replay.stdout

        await reader.until(lambda: request_id in reader.keys("assets"), timeout=OUTCOME_S)
    (asset_value,) = [v for v in reader.values("assets") if v["id"] == request_id]
    outcome = AssetReadyEvent.model_validate(asset_value)
    assert outcome.image == ref and outcome.status in ("ok", "no_match")
    for item in outcome.assets:
        assert Image.open(io.BytesIO(store.get(item.asset))).mode == "RGBA"
    # The replay kept the trace: both attempts hang off the upstream span, in one tree.
    process = f"process {settings.topics.images}"
    spans = await asyncio.to_thread(
        receiver.wait_for,
        lambda got: (
            sum(s.trace_id == trace_id and s.name == process for s in got) >= 2
            and any(s.trace_id == trace_id and s.name == "predict" for s in got)
        ),
        60,
        "the failed and the replayed seg attempt",
    )
    trace = [s for s in spans if s.trace_id == trace_id]
    assert not tree_problems(trace, upstream_span), tree_problems(trace, upstream_span)


def test_workers_exit_cleanly_on_sigterm(pipeline: Pipeline) -> None:
    for worker in pipeline.workers:
        worker.alive()
        worker.proc.send_signal(signal.SIGTERM)
    for worker in pipeline.workers:
        try:
            rc = worker.proc.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{worker.kind} did not stop:\n{worker.log()[-4000:]}")
        assert rc == 0, worker.log()[-4000:]
        assert f"stage {worker.kind} stopped" in worker.log()
