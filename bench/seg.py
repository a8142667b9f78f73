"""Segmenter benchmarks, measured side by side in one run, on this machine's CPU.

(a) worker overhead: the same images segmented (tiny profile) through the
    worker (publish image-ready to an embedded broker, the stage runtime, blob
    reads, SegStage, blob writes, asset-ready consumed) and called directly
    (prompts, SAM, finishing, RLE and PNG/RGBA encoding, in memory), interleaved
    image by image. Reports p50/p95 of the latency the worker adds per image
    (worker minus direct, paired per image; target p50 <= 25 ms) and the ratio.
(b) embedding cache: the ``random`` ViT-B (1024 px encoder input) on the CPU: a
    second target on the same image against the first (target >= 50x faster).

Kafka hops: tansu (the embedded broker) answers a fetch during which a record
arrives before the consumer's ``fetch_max_wait_ms`` runs out, but not at once (Kafka
itself answers at once), so on tansu a hop costs more with a longer wait (p50 2.8 ms
at 25 ms, 23 ms at 100: ``bench/idle_polling.py``; aiokafka's default wait is 500 ms).
The measuring client here uses 5 ms; the worker waits what ``genseg worker`` waits
(``KAFKA_FETCH_MAX_WAIT_MS``, 25 ms by default) unless ``--fetch-wait-ms`` says
otherwise, and the JSON says which wait it ran with.

Usage: ``python bench/seg.py [--images 40] [--cache-repeats 2] [--skip-cache]``.
The last line printed is one JSON object ``{"bench": "seg", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.machine import describe
from genseg.workers import build_runtimes
from plumbing.blobstore import BlobStore
from plumbing.broker import EmbeddedBroker
from plumbing.images import encode_heatmap, encode_png
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import (
    AssetReadyEvent,
    ImageReadyEvent,
    ResolvedParams,
    SegmentationOptions,
    parse_event,
)
from seg_worker import CachedPredictor, SegConfig, Segmenter
from seg_worker.finishing import encode_rle, mask_png, rgba_png
from seg_worker.profiles import load_sam

log = logging.getLogger("bench.seg")

TARGETS = ("cup", "plate")


def machine() -> dict[str, object]:
    """What ran the benchmark."""
    return {
        **describe(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank on the sorted sample), rounded to 0.01."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[rank], 2)


def make_case(seed: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A distinct image (so no cache hit across images) with two objects and their heat maps."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
    s = size // 8
    heats = {}
    for k, target in enumerate(TARGETS):
        y, x = rng.integers(0, s - s // 3, 2)
        image[8 * y : 8 * (y + s // 4), 8 * x : 8 * (x + s // 4)] = (200, 40 + 120 * k, 40)
        heat = np.zeros((s, s), np.float32)
        heat[y : y + s // 4, x : x + s // 4] = 1.0
        heats[target] = heat
    return image, heats


def direct(
    segmenter: Segmenter,
    image: np.ndarray,
    sha: str,
    heats: dict[str, np.ndarray],
    opts: SegmentationOptions,
) -> int:
    """The segmentation itself, in memory: what the worker wraps. Returns the object count."""
    objects = segmenter.segment(image, sha, opts, targets=list(TARGETS), heatmaps=heats)
    for obj in objects:
        mask_png(obj.mask)
        encode_rle(obj.mask)
        rgba_png(image, obj.mask, obj.bbox)
    return len(objects)


async def bench_worker(
    n_images: int, warmup: int, size: int, fetch_wait_ms: int | None
) -> dict[str, object]:
    """(a): worker vs direct, interleaved per image."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker,
    ):
        settings = Settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            topic_prefix=f"bench{os.getpid()}",
            blob_url=str(Path(tmp) / "blobs"),
            models="tiny",
        )
        await ensure_topics(settings, partitions=1)
        store = BlobStore.from_url(settings.blob_url)
        opts = SegmentationOptions(min_confidence=0.0)
        cases = []
        for i in range(warmup + n_images):  # the generator's writes: not part of the timing
            image, heats = make_case(i, size)
            image_ref = store.put(
                f"b{i}/0/gen/image.png", encode_png(Image.fromarray(image)), "image/png"
            )
            heat_refs = {
                t: store.put(f"b{i}/0/gen/heat-{t}.png", encode_heatmap(h), "image/png")
                for t, h in heats.items()
            }
            event = ImageReadyEvent(
                id=f"b{i}",
                image=image_ref,
                params=ResolvedParams(
                    prompt="a cup and a plate",
                    width=size,
                    height=size,
                    steps=1,
                    guidance_scale=7.5,
                    sampler="dpmpp_2m",
                    seed=i,
                ),
                model="tiny",
                heatmaps=heat_refs,
                targets=list(TARGETS),
                segmentation=opts,
            )
            cases.append((event, image, heats))

        # Same weights, separate caches: each path encodes each image once.
        segmenter = Segmenter(
            CachedPredictor(load_sam("tiny", "tiny")), SegConfig.for_profile("tiny")
        )
        # The worker as `genseg worker seg --no-scenes` runs it; its models load when it
        # starts, before anything is timed.
        [worker] = build_runtimes("seg", settings, scenes=False, fetch_max_wait_ms=fetch_wait_ms)
        # What the runtime waits (its own setting, else KAFKA_FETCH_MAX_WAIT_MS).
        fetch_wait = worker.config.fetch_max_wait_ms or settings.kafka_fetch_max_wait_ms
        worker_ms, direct_ms, phases = [], [], []
        kafka_in: list[float] = []
        kafka_out: list[float] = []
        async with worker, Publisher(settings) as pub:
            # The measuring client polls with a short fetch wait: on tansu a longer one
            # reads a record later (see the docstring).
            consumer = AIOKafkaConsumer(fetch_max_wait_ms=5, **settings.kafka_kwargs())
            await consumer.start()
            try:
                tp = TopicPartition(settings.topics.assets, 0)
                consumer.assign([tp])
                await consumer.seek_to_end(tp)
                for i, (event, image, heats) in enumerate(cases):
                    t0 = time.perf_counter()
                    n_direct = await asyncio.to_thread(
                        direct, segmenter, image, event.image.sha256, heats, opts
                    )
                    t1, wall1 = time.perf_counter(), time.time()
                    await pub.publish(settings.topics.images, event)
                    asset, produced_ms = await next_asset(consumer, event.id)
                    t2, wall2 = time.perf_counter(), time.time()
                    if len(asset.assets) != n_direct:
                        raise AssertionError(
                            f"{event.id}: worker {len(asset.assets)} objects, direct {n_direct}"
                        )
                    if i >= warmup:
                        direct_ms.append((t1 - t0) * 1e3)
                        worker_ms.append((t2 - t1) * 1e3)
                        phases.append(asset.timings_ms)
                        handler = sum(
                            v for k, v in asset.timings_ms.items() if k.startswith("seg.")
                        )
                        # record timestamps (ms, the producer's clock: this process)
                        kafka_in.append(produced_ms - wall1 * 1e3 - handler)
                        kafka_out.append(wall2 * 1e3 - produced_ms)
            finally:
                await consumer.stop()
    added = [w - d for w, d in zip(worker_ms, direct_ms, strict=True)]
    phase_p50 = {
        name: pct([p.get(name, 0.0) for p in phases], 50)
        for name in sorted({k for p in phases for k in p})
    }
    return {
        "images": n_images,
        "runtime_fetch_max_wait_ms": fetch_wait,
        "image_px": f"{size}x{size}",
        "targets_per_image": len(TARGETS),
        "direct_ms": {"p50": pct(direct_ms, 50), "p95": pct(direct_ms, 95)},
        "worker_ms": {"p50": pct(worker_ms, 50), "p95": pct(worker_ms, 95)},
        "added_ms": {"p50": pct(added, 50), "p95": pct(added, 95)},
        "ratio_p50": round(statistics.median(worker_ms) / statistics.median(direct_ms), 2),
        "worker_phases_p50_ms": phase_p50,
        # publish -> asset record produced, less the handler; asset produced -> consumed here
        "kafka_in_p50_ms": pct(kafka_in, 50),
        "kafka_out_p50_ms": pct(kafka_out, 50),
        "target_added_p50_ms": 25,
    }


async def next_asset(
    consumer: AIOKafkaConsumer, request_id: str, timeout: float = 60.0
) -> AssetReadyEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=1000)
        for records in batches.values():
            for record in records:
                event = parse_event(record.value, AssetReadyEvent)
                if event.id == request_id:
                    return event, record.timestamp
    raise TimeoutError(f"no asset-ready event for {request_id} within {timeout}s")


def bench_cache(repeats: int, size: int) -> dict[str, object]:
    """(b): random ViT-B at 1024 px: second target on the same image vs the first."""
    t = time.perf_counter()
    model = load_sam("random", "vit_b")
    build_s = time.perf_counter() - t
    segmenter = Segmenter(CachedPredictor(model), SegConfig.for_profile("random"))
    opts = SegmentationOptions(min_confidence=0.0)
    first, second = [], []
    for r in range(repeats):
        image, heats = make_case(1000 + r, size)
        sha = f"cache-bench-{r}"

        def run(target: str, image=image, heats=heats, sha=sha) -> float:
            t0 = time.perf_counter()
            segmenter.segment(image, sha, opts, targets=[target], heatmaps={target: heats[target]})
            return (time.perf_counter() - t0) * 1e3

        first.append(run(TARGETS[0]))
        # further targets on the same image, several times: a short call is easily
        # disturbed by other work on the machine, the median is not
        second.append(statistics.median(run(TARGETS[1 - k % 2]) for k in range(5)))
        log.info("cache repeat %d: first %.0f ms, second %.1f ms", r, first[-1], second[-1])
    p = segmenter.predictor
    return {
        "model": "random vit_b, 1024 px input",
        "image_px": f"{size}x{size}",
        "repeats": repeats,
        "build_s": round(build_s, 2),
        "first_target_ms": round(statistics.median(first), 1),
        "second_target_ms": round(statistics.median(second), 2),
        "speedup": round(statistics.median(first) / statistics.median(second), 1),
        "encoder_images": p.encoder_images,
        "cache_hits": p.cache.hits,
        "target_speedup": 50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="timed images for (a)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--cache-repeats", type=int, default=2, help="images for (b)")
    parser.add_argument("--skip-cache", action="store_true", help="skip (b) (ViT-B on the CPU)")
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=None,
        help="the worker's RuntimeConfig.fetch_max_wait_ms (default: KAFKA_FETCH_MAX_WAIT_MS, "
        "as genseg worker runs)",
    )
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    info = machine()
    print(f"machine: {info}")
    worker = asyncio.run(bench_worker(args.images, args.warmup, args.size, args.fetch_wait_ms))
    print(
        f"(a) worker vs direct, tiny, {worker['image_px']}, {args.images} images: "
        f"direct p50 {worker['direct_ms']['p50']} ms, worker p50 {worker['worker_ms']['p50']} ms; "
        f"added p50 {worker['added_ms']['p50']} ms p95 {worker['added_ms']['p95']} ms "
        f"(target p50 <= 25 ms); ratio {worker['ratio_p50']}x"
    )
    result: dict[str, object] = {"bench": "seg", "machine": info, "worker": worker}
    if not args.skip_cache:
        cache = bench_cache(args.cache_repeats, args.size)
        print(
            f"(b) cache, {cache['model']}: first target {cache['first_target_ms']} ms, "
            f"second {cache['second_target_ms']} ms: {cache['speedup']}x (target >= 50x)"
        )
        result["cache"] = cache
    print(json.dumps(result))


if __name__ == "__main__":
    main()
