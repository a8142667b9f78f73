"""``genseg demo``: the whole pipeline in one process, with progress and a contact sheet.

Starts the embedded broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` is set), a generator
and a segmenter runtime, submits one prompt, follows its events, and writes the
image, heat maps, masks, RGBA assets, a contact sheet and the events to ``out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

from consumers.subscriber import Subscriber
from genseg.contact_sheet import colorize_heatmap, contact_sheet
from genseg.profiles import profile_defaults
from genseg.workers import build_runtimes, running
from plumbing.blobstore import BlobStore
from plumbing.broker import EmbeddedBroker
from plumbing.images import decode_heatmap, decode_image
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from plumbing.telemetry import TRACER_NAME
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

#: One process, fresh groups: a short session so tansu completes each join in ~3 s; the
#: demo creates the topics itself (one partition each).
QUICK_JOIN: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    "create_topics": False,
}


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
    #: Targets the generator's tokenizer did not find in the prompt: nothing cut out.
    missing_targets: list[str] = field(default_factory=list)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "object"


class DemoFailed(RuntimeError):
    """The request ended in the dead-letter topic, or not at all."""


@dataclass(frozen=True)
class DemoRun:
    """What one demo run works with: settings, output directory and request options, the
    profile's defaults filled in (:mod:`genseg.profiles`)."""

    settings: Settings
    out_dir: Path
    size: int
    steps: int
    seed: int | None
    min_confidence: float
    timeout_s: float
    console: Console
    tracer_provider: trace.TracerProvider | None

    @classmethod
    def of(
        cls,
        settings: Settings,
        out_dir: Path,
        *,
        size: int | None = None,
        steps: int | None = None,
        seed: int | None = 7,
        min_confidence: float | None = None,
        timeout_s: float = 600.0,
        console: Console | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> DemoRun:
        """The run, its output directory made; ``size``, ``steps`` and ``min_confidence``
        default to the profile's, ``console`` to a new one."""
        defaults = profile_defaults(settings.models)
        out_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            settings, out_dir, size or defaults.demo_size, steps or defaults.demo_steps, seed,
            defaults.demo_min_confidence if min_confidence is None else min_confidence,
            timeout_s, console or Console(), tracer_provider,
        )  # fmt: skip

    @contextlib.contextmanager
    def on_a_broker(self) -> Iterator[DemoRun]:
        """This run on the broker of ``KAFKA_BOOTSTRAP_SERVERS`` when set, else on an
        embedded broker started for the block (its log in ``out_dir``)."""
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            yield self
            return
        broker = EmbeddedBroker(log_path=self.out_dir / "broker.log")
        with self.console.status("starting the embedded broker"):
            broker.start()
        self.console.print(f"embedded broker on [bold]{broker.bootstrap_servers}[/]")
        servers = {"kafka_bootstrap_servers": broker.bootstrap_servers}
        try:
            yield dataclasses.replace(self, settings=self.settings.model_copy(update=servers))
        finally:
            broker.stop()

    def loading(self) -> contextlib.AbstractContextManager[Any]:
        """The spinner shown while the workers load their models and join their groups."""
        return self.console.status(f"loading {self.settings.models} models and joining groups")


async def run_demo(prompt: str, targets: list[str], run: DemoRun) -> DemoResult:
    """Run one request through an in-process pipeline and write its outputs to
    ``run.out_dir``."""
    with run.on_a_broker() as run:
        return await _run(prompt, targets, run)


def progress_columns() -> tuple[ProgressColumn, ...]:
    return (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )


async def _run(prompt: str, targets: list[str], run: DemoRun) -> DemoResult:
    settings, console = run.settings, run.console
    await ensure_topics(settings, partitions=1)
    runtimes = [
        *build_runtimes("gen", settings, tracer_provider=run.tracer_provider, **QUICK_JOIN),
        *build_runtimes("seg", settings, scenes=False, tracer_provider=run.tracer_provider,
                        **QUICK_JOIN),
    ]  # fmt: skip
    request_id = new_request_id("demo")
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=run.tracer_provider)
    events: dict[str, Event] = {}
    async with running(runtimes, while_starting=run.loading()):
        started = time.monotonic()
        async with Subscriber(
            settings, ["images", "masks", "assets", "dlq", "progress"], only_key=request_id
        ) as sub:
            with tracer.start_as_current_span("genseg demo") as root:
                trace_id = f"{root.get_span_context().trace_id:032x}"
                async with GensegClient(settings, tracer_provider=run.tracer_provider) as client:
                    await client.submit(
                        prompt, targets=targets, request_id=request_id, width=run.size,
                        height=run.size, steps=run.steps, seed=run.seed,
                        segmentation={"min_confidence": run.min_confidence},
                    )  # fmt: skip
            console.print(f"submitted [bold]{request_id}[/] (trace {trace_id})")
            await _follow(sub, events, run.steps, run.timeout_s, console)
    wall = time.monotonic() - started
    terminal = events.get("terminal")
    if isinstance(terminal, DeadLetterEvent):
        raise DemoFailed(f"request dead-lettered: {terminal.error.type}: {terminal.error.message}")
    assert isinstance(terminal, AssetReadyEvent)
    image = events.get("image")
    result = DemoResult(
        request_id=request_id, trace_id=trace_id, out_dir=run.out_dir, status=terminal.status,
        timings_ms=dict(terminal.timings_ms), wall_s=wall,
        missing_targets=list(image.missing_targets) if isinstance(image, ImageReadyEvent) else [],
    )  # fmt: skip
    result.files = _write_outputs(settings, events, run.out_dir)
    return result


async def _follow(
    sub: Subscriber, events: dict[str, Event], steps: int, timeout_s: float, console: Console
) -> None:
    """Show progress until the request's terminal event arrives."""
    deadline = time.monotonic() + timeout_s
    with Progress(*progress_columns(), console=console, transient=False) as progress:
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
        path = out_dir / f"heatmap-{slug(target)}.png"
        heat.save(path)
        files.append(path)
        first_heat = first_heat or heat
    rows = []
    # The asset-ready event references every mask, in the order of its assets: the
    # mask-ready event travels on another topic and may arrive after it (or not yet).
    for k, (mask_ref, item) in enumerate(zip(asset_event.masks, asset_event.assets, strict=False)):
        name = f"{k}-{slug(item.label)}"
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
