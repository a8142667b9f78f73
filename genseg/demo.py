"""``genseg demo``: the whole pipeline in one process, with progress and a contact sheet.

Starts the embedded broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` is set), a generator
and a segmenter runtime, submits one prompt, follows its events, and writes the
image, heat maps, masks, RGBA assets, a contact sheet and the events to ``out``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.subscriber import Subscriber
from genseg.admin import ensure_topics
from genseg.blobstore import BlobStore
from genseg.broker import EmbeddedBroker
from genseg.contact_sheet import colorize_heatmap, contact_sheet
from genseg.images import decode_heatmap, decode_image
from genseg.settings import Settings
from genseg.telemetry import TRACER_NAME
from producers.client import GensegClient, new_request_id
from schemas import (
    AssetReadyEvent,
    DeadLetterEvent,
    Event,
    ImageReadyEvent,
    MasksReadyEvent,
    ProgressEvent,
)

log = logging.getLogger(__name__)

#: Default image side per model profile: tiny models are random, so small is honest and fast.
DEFAULT_SIZE = {"tiny": 128, "random": 512, "pretrained": 512}
DEFAULT_STEPS = {"tiny": 20, "random": 25, "pretrained": 25}
#: Random SAM weights never predict an IoU near the contract's 0.8 default; the tiny
#: demo keeps every mask so that each kind of output is shown (and says so).
DEFAULT_MIN_CONFIDENCE = {"tiny": 0.0, "random": 0.0, "pretrained": 0.8}


@dataclass
class DemoResult:
    request_id: str
    trace_id: str
    out_dir: Path
    status: str
    files: list[Path] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "object"


class DemoFailed(RuntimeError):
    """The request ended in the dead-letter topic, or not at all."""


async def run_demo(
    prompt: str,
    targets: list[str],
    *,
    settings: Settings,
    out_dir: Path,
    size: int | None = None,
    steps: int | None = None,
    seed: int | None = 7,
    min_confidence: float | None = None,
    timeout_s: float = 600.0,
    console: Console | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> DemoResult:
    """Run one request through an in-process pipeline and write its outputs to ``out_dir``."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any I/O loop
    broker: EmbeddedBroker | None = None
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        broker = EmbeddedBroker(log_path=out_dir / "broker.log")
        with console.status("starting the embedded broker"):
            broker.start()
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers})
        console.print(f"embedded broker on [bold]{broker.bootstrap_servers}[/]")
    try:
        return await _run(
            prompt, targets, settings=settings, out_dir=out_dir,
            size=size or DEFAULT_SIZE[settings.models],
            steps=steps or DEFAULT_STEPS[settings.models], seed=seed, timeout_s=timeout_s,
            min_confidence=(
                DEFAULT_MIN_CONFIDENCE[settings.models] if min_confidence is None
                else min_confidence
            ),
            console=console, tracer_provider=tracer_provider,
        )  # fmt: skip
    finally:
        if broker is not None:
            broker.stop()


async def _run(
    prompt: str,
    targets: list[str],
    *,
    settings: Settings,
    out_dir: Path,
    size: int,
    steps: int,
    seed: int | None,
    min_confidence: float,
    timeout_s: float,
    console: Console,
    tracer_provider: trace.TracerProvider | None,
) -> DemoResult:
    from gen_worker.handler import GenStage
    from seg_worker.handler import SegStage

    await ensure_topics(settings, partitions=1)
    quick = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "create_topics": False}
    gen = StageRuntime(
        GenStage(settings), settings, RuntimeConfig(max_batch=4, **quick),
        tracer_provider=tracer_provider,
    )  # fmt: skip
    seg = StageRuntime(
        SegStage(settings), settings, RuntimeConfig(**quick), tracer_provider=tracer_provider
    )
    request_id = new_request_id("demo")
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    events: dict[str, Event] = {}
    try:  # a runtime that fails to start must not leave the other one running
        with console.status(f"loading {settings.models} models and joining consumer groups"):
            await gen.start()
            await seg.start()
        started = time.monotonic()
        async with Subscriber(
            settings, ["images", "masks", "assets", "dlq", "progress"], only_key=request_id
        ) as sub:
            with tracer.start_as_current_span("genseg demo") as root:
                trace_id = f"{root.get_span_context().trace_id:032x}"
                async with GensegClient(settings, tracer_provider=tracer_provider) as client:
                    await client.submit(
                        prompt, targets=targets, request_id=request_id, width=size,
                        height=size, steps=steps, seed=seed,
                        segmentation={"min_confidence": min_confidence},
                    )  # fmt: skip
            console.print(f"submitted [bold]{request_id}[/] (trace {trace_id})")
            await _follow(sub, events, steps, timeout_s, console)
    finally:
        await gen.stop()
        await seg.stop()
    wall = time.monotonic() - started
    terminal = events.get("terminal")
    if isinstance(terminal, DeadLetterEvent):
        raise DemoFailed(f"request dead-lettered: {terminal.error.type}: {terminal.error.message}")
    assert isinstance(terminal, AssetReadyEvent)
    result = DemoResult(
        request_id=request_id, trace_id=trace_id, out_dir=out_dir, status=terminal.status,
        timings_ms=dict(terminal.timings_ms), wall_s=wall,
    )  # fmt: skip
    result.files = _write_outputs(settings, events, out_dir)
    return result


async def _follow(
    sub: Subscriber, events: dict[str, Event], steps: int, timeout_s: float, console: Console
) -> None:
    """Show progress until the request's terminal event arrives."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout_s
    with Progress(*columns, console=console, transient=False) as progress:
        denoise = progress.add_task("denoising", total=steps)
        segment = progress.add_task("segmenting", total=1, start=False)
        while "terminal" not in events:
            if time.monotonic() > deadline:
                raise DemoFailed(f"no outcome within {timeout_s:.0f}s")
            for _topic, event in await sub.next_events(0.5):
                if isinstance(event, ProgressEvent):
                    progress.update(denoise, completed=event.step, total=event.steps)
                elif isinstance(event, ImageReadyEvent):
                    events["image"] = event
                    progress.update(denoise, completed=progress.tasks[denoise].total)
                    progress.start_task(segment)
                elif isinstance(event, MasksReadyEvent):
                    events["masks"] = event
                elif isinstance(event, AssetReadyEvent | DeadLetterEvent):
                    events["terminal"] = event
                    progress.update(segment, completed=1)


def _write_outputs(settings: Settings, events: dict[str, Event], out_dir: Path) -> list[Path]:
    blob = BlobStore.from_url(settings.blob_url)
    image_event = events["image"]
    asset_event = events["terminal"]
    assert isinstance(image_event, ImageReadyEvent) and isinstance(asset_event, AssetReadyEvent)
    limit = settings.max_image_pixels
    files: list[Path] = []

    def save(name: str, data: bytes) -> Path:
        path = out_dir / name
        path.write_bytes(data)
        files.append(path)
        return path

    save("image.png", blob.get(image_event.image))
    image = decode_image(blob.get(image_event.image), max_pixels=limit)
    first_heat = None
    for target, ref in image_event.heatmaps.items():
        heat = colorize_heatmap(decode_heatmap(blob.get(ref)), image.size)
        path = out_dir / f"heatmap-{_slug(target)}.png"
        heat.save(path)
        files.append(path)
        first_heat = first_heat or heat
    rows = []
    # The asset-ready event references every mask, in the order of its assets: the
    # mask-ready event travels on another topic and may arrive after it (or not yet).
    for k, (mask_ref, item) in enumerate(zip(asset_event.masks, asset_event.assets, strict=False)):
        name = f"{k}-{_slug(item.label)}"
        mask_data = blob.get(mask_ref)
        asset_data = blob.get(item.asset)
        save(f"mask-{name}.png", mask_data)
        save(f"asset-{name}.png", asset_data)
        rows.append(
            (
                f"{item.label} ({item.score:.2f})",
                decode_image(mask_data, max_pixels=limit, mode="L"),
                decode_image(asset_data, max_pixels=limit, mode="RGBA"),
            )
        )
    sheet = contact_sheet(image, first_heat, rows)
    sheet_path = out_dir / "contact_sheet.png"
    sheet.save(sheet_path)
    files.append(sheet_path)
    dump: dict[str, Any] = {k: v.model_dump(mode="json") for k, v in events.items()}
    save("events.json", json.dumps(dump, indent=2).encode())
    return files
