"""A four-view scene through real seg worker processes: one scene-ready event, even when the
worker segmenting a view is SIGKILLed mid-view and its record redelivered to another.

Workers are ``python -m genseg.cli worker seg`` processes (tiny models), which also run
the scene stage. To kill a worker *inside* a view's handler, deterministically, the
view's image blob is a FIFO: the worker's read blocks on it until the test, holding the
write end open, has seen it block; then the worker is killed, the FIFO is replaced by
the real image, and a second worker gets the uncommitted record.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plumbing.blobstore import LocalBlobStore, blob_key
from plumbing.images import encode_png
from plumbing.kafka import ensure_topics
from plumbing.mesh import load_glb
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import ImageReadyEvent, ResolvedParams, SceneOptions, SceneReadyEvent, SceneViewRecord
from tests import forkserver
from tests.kafka_utils import TopicReader, committed_offsets, eventually
from tests.rel_utils import logged

ANGLES = (0, 45, 90, 135)
SIZE = 64
PARTITIONS = 2


def start_worker(settings: Settings, name: str, log_dir: Path) -> tuple[forkserver.Process, Path]:
    log_path = log_dir / f"{name}.log"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "GENSEG_TOPIC_PREFIX": settings.topic_prefix,
        "GENSEG_BLOB_URL": settings.blob_url,
        "GENSEG_MODELS": "tiny",
        "GENSEG_DEVICE": "cpu",
        "OTEL_SDK_DISABLED": "true",
        "COLUMNS": "400",  # one log record per line
    }
    command = [sys.executable, "-m", "genseg.cli", "worker", "seg", "--torch-threads", "1"]
    command += ["--partitions", str(PARTITIONS), "--log-level", "INFO"]
    with log_path.open("wb") as log:
        proc = forkserver.popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent
        )
    return proc, log_path


def room_image(angle: int) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 60 + angle // 3, np.uint8)
    image[8:30, 6:40] = (200, 60, 40)  # "sofa"
    image[40:56, 30:58] = (90, 60, 30)  # "coffee table"
    return image


def image_ready(store: LocalBlobStore, scene: str, angle: int, *, fifo: bool) -> ImageReadyEvent:
    request_id = f"{scene}.view-{angle}"
    key = blob_key(request_id, 0, "gen", "image.png")
    data = encode_png(Image.fromarray(room_image(angle)))
    ref = store.put(key, data, "image/png")  # the reference: size and sha256 of the real bytes
    if fifo:
        path = store.root / key
        os.replace(path, path.with_name("image.real"))
        os.mkfifo(path)
    return ImageReadyEvent(
        id=request_id,
        image=ref,
        params=ResolvedParams(
            prompt=f"a modern living room, view from {angle} degrees",
            width=SIZE,
            height=SIZE,
            steps=2,
            guidance_scale=7.5,
            sampler="dpmpp_2m",
            seed=angle,
        ),
        model="tiny",
        targets=["sofa", "coffee table"],
        segmentation={
            "mode": "boxes",
            "boxes": [[6, 8, 34, 22], [30, 40, 28, 16]],
            "min_confidence": 0.0,
            "smooth_px": 0,
        },
        scene=SceneOptions(
            scene_id=scene, view=str(angle), views_total=4, angle=angle, outputs=["depth", "mesh"]
        ),
    )


def open_writer_when_read(path: Path) -> int | None:
    """The FIFO's write end once a reader has it open (the worker is blocked in its read)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


@pytest.mark.slow
async def test_one_scene_ready_event_when_a_segmenter_dies_mid_view(
    settings: Settings, tmp_path: Path
) -> None:
    await ensure_topics(settings, partitions=PARTITIONS)
    store = LocalBlobStore(settings.blob_url)
    scene = "living-room"
    events = {a: image_ready(store, scene, a, fifo=a == 135) for a in ANGLES}
    fifo = store.root / blob_key(events[135].id, 0, "gen", "image.png")
    first, first_log = start_worker(settings, "first", tmp_path)
    second = writer = None
    try:
        for stage in ("seg", "scene"):
            await eventually(lambda s=stage: logged(first, first_log, f"stage {s} assigned ["), 90)
        async with TopicReader(settings, "assets", "scenes", "dlq", "scene-views") as reader:
            async with Publisher(settings) as pub:
                for angle in ANGLES[:3]:
                    await pub.publish(settings.topics.images, events[angle])
                await reader.until(lambda: len(set(reader.keys("assets"))) == 3, timeout=90)
                await pub.publish(settings.topics.images, events[135])

            # The first worker is now inside view 135's handler, blocked reading its image.
            deadline = time.monotonic() + 60
            while (writer := open_writer_when_read(fifo)) is None:
                assert first.poll() is None and time.monotonic() < deadline, "never read"
                await reader.poll(50)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            os.close(writer)
            writer = None
            os.replace(fifo.with_name("image.real"), fifo)

            second, second_log = start_worker(settings, "second", tmp_path)
            await reader.until(lambda: scene in reader.keys("scenes"), timeout=120)
            # One more redelivery of a "view done" record after the scene was published.
            done = [r for r in reader.records[settings.topics.scene_views]]
            async with Publisher(settings) as pub:
                meta = await pub.send(
                    settings.topics.scene_views, done[-1].value, key=scene, headers=[]
                )
                last = await meta
            group = f"{settings.topic_prefix}.scene"

            async def all_handled() -> bool:
                offsets = await committed_offsets(
                    settings, group, settings.topics.scene_views, PARTITIONS
                )
                return (offsets.get(last.partition) or 0) > last.offset

            deadline = time.monotonic() + 60
            while not await all_handled():
                assert time.monotonic() < deadline, "the redelivered record was never committed"
                await reader.poll(200)
            await reader.poll(500)
            assert logged(second, second_log, f"scene {scene}: checked the scenes topic")
    finally:
        if writer is not None:
            os.close(writer)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                if proc.poll() is None:
                    proc.kill()

    assert reader.values("dlq") == []
    assert Counter(reader.keys("scenes")) == {scene: 1}
    assert Counter(reader.keys("assets"))[events[135].id] == 1, "the killed worker never published"
    records = [SceneViewRecord.model_validate(v) for v in reader.values("scene-views")]
    assert {r.view.view for r in records} == {str(a) for a in ANGLES}
    [ready] = [SceneReadyEvent.model_validate(v) for v in reader.values("scenes")]
    assert [v.view for v in ready.views] == [str(a) for a in ANGLES]
    assert [v.angle for v in ready.views] == [float(a) for a in ANGLES]
    for view in ready.views:
        assert view.depth is not None and view.mesh is not None
        assert sorted(view.objects) == ["coffee table", "sofa"]
    glb = load_glb(store.get(ready.views[3].mesh))
    assert len(glb.geometry) == 3  # background, sofa, coffee table
