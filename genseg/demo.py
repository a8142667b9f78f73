"""``genseg demo``: the whole pipeline in one process, with progress and a contact sheet.

Starts the embedded broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` is set), a generator
and a segmenter runtime, submits one prompt, follows its events, and writes the
image, heat maps, masks, RGBA assets, a contact sheet and the events to ``out``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry import trace
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.subscriber import Subscriber
from genseg.contact_sheet import (
    LABEL_H,
    PAD,
    TILE,
    colorize_heatmap,
    contact_sheet,
    on_checkerboard,
)
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
    SceneReadyEvent,
)

log = logging.getLogger(__name__)

#: Default image side per model profile: tiny models are random, so small is honest and
#: fast; the toy models were trained on 64x64 scenes.
DEFAULT_SIZE = {"tiny": 128, "toy": 64, "random": 512, "pretrained": 512}
DEFAULT_STEPS = {"tiny": 20, "toy": 25, "random": 25, "pretrained": 25}
#: Random SAM weights never predict an IoU near the contract's 0.8 default; the tiny
#: demo keeps every mask so that each kind of output is shown (and says so). The toy
#: SAM is trained, its IoU head too: the contract's default applies.
DEFAULT_MIN_CONFIDENCE = {"tiny": 0.0, "toy": 0.8, "random": 0.0, "pretrained": 0.8}
#: One process, fresh groups: a short session so tansu completes each join in ~3 s.
_QUICK_JOIN: dict[str, Any] = {
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


@contextlib.asynccontextmanager
async def _running(
    runtimes: list[StageRuntime], console: Console, models: str
) -> AsyncIterator[None]:
    """Start ``runtimes`` in order; stop those started, however the block is left.

    A runtime that fails to start must not leave the others running.
    """
    started: list[StageRuntime] = []
    try:
        with console.status(f"loading {models} models and joining consumer groups"):
            for runtime in runtimes:
                await runtime.start()
                started.append(runtime)
        yield
    finally:
        for runtime in reversed(started):
            await runtime.stop()


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
    gen = StageRuntime(
        GenStage(settings), settings, RuntimeConfig(max_batch=4, **_QUICK_JOIN),
        tracer_provider=tracer_provider,
    )  # fmt: skip
    seg = StageRuntime(
        SegStage(settings), settings, RuntimeConfig(**_QUICK_JOIN), tracer_provider=tracer_provider
    )
    request_id = new_request_id("demo")
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    events: dict[str, Event] = {}
    async with _running([gen, seg], console, settings.models):
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


# --- the scene demo: several views, depth maps, .glb files, one scene-ready event ---------


@dataclass
class SceneDemoResult:
    scene_id: str
    trace_id: str
    out_dir: Path
    scene: SceneReadyEvent
    views: list[AssetReadyEvent]
    files: list[Path] = field(default_factory=list)
    wall_s: float = 0.0


async def run_scene_demo(
    prompt: str,
    views: list[float],
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
) -> SceneDemoResult:
    """Generate ``prompt`` from each angle of ``views`` (one batch on the generator), cut
    out ``targets``, estimate depth, export each view as a .glb, and wait for the one
    scene-ready event; write everything under ``out_dir``."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before any I/O loop
    prompt = scene_prompt(prompt, targets)
    console.print(f"scene prompt: [bold]{prompt}[/]")
    broker: EmbeddedBroker | None = None
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        broker = EmbeddedBroker(log_path=out_dir / "broker.log")
        with console.status("starting the embedded broker"):
            broker.start()
        settings = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers})
        console.print(f"embedded broker on [bold]{broker.bootstrap_servers}[/]")
    profile = settings.models
    try:
        return await _run_scene(
            prompt, views, targets, settings=settings, out_dir=out_dir,
            size=size or DEFAULT_SIZE[profile], steps=steps or DEFAULT_STEPS[profile], seed=seed,
            min_confidence=(
                DEFAULT_MIN_CONFIDENCE[profile] if min_confidence is None else min_confidence
            ),
            timeout_s=timeout_s, console=console, tracer_provider=tracer_provider,
        )  # fmt: skip
    finally:
        if broker is not None:
            broker.stop()


def scene_prompt(prompt: str, targets: list[str]) -> str:
    """``prompt`` naming every target: the generator's heat maps (and so the cut-outs)
    follow the target's words in the prompt, e.g. "modern living room, with a sofa"."""
    missing = [t for t in targets if t.lower() not in prompt.lower()]
    return f"{prompt}, with " + " and ".join(f"a {t}" for t in missing) if missing else prompt


async def _run_scene(
    prompt: str,
    views: list[float],
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
) -> SceneDemoResult:
    from gen_worker.handler import GenStage
    from scene_worker import SceneStage
    from seg_worker.handler import SegStage

    await ensure_topics(settings, partitions=1)
    # The views arrive together and share their parameters: one generator batch.
    runtimes = [
        StageRuntime(
            GenStage(settings), settings,
            RuntimeConfig(max_batch=max(4, len(views)), max_wait_ms=500, **_QUICK_JOIN),
            tracer_provider=tracer_provider,
        ),
        StageRuntime(SegStage(settings), settings, RuntimeConfig(**_QUICK_JOIN),
                     tracer_provider=tracer_provider),
        StageRuntime(SceneStage(settings), settings, RuntimeConfig(**_QUICK_JOIN),
                     tracer_provider=tracer_provider),
    ]  # fmt: skip
    scene_id = new_request_id("scene")
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    async with _running(runtimes, console, settings.models):
        started = time.monotonic()
        topics = ["images", "assets", "dlq", "scenes", "progress"]
        async with Subscriber(settings, topics) as sub:
            with tracer.start_as_current_span("genseg demo --scene") as root:
                trace_id = f"{root.get_span_context().trace_id:032x}"
                async with GensegClient(settings, tracer_provider=tracer_provider) as client:
                    ids = await client.submit_views(
                        prompt, views=views, scene_id=scene_id, targets=targets, width=size,
                        height=size, steps=steps, seed=seed,
                        segmentation={"min_confidence": min_confidence},
                    )  # fmt: skip
            console.print(
                f"submitted scene [bold]{scene_id}[/]: {len(ids)} views (trace {trace_id})"
            )
            scene, images, assets = await _follow_scene(
                sub, scene_id, set(ids), steps, timeout_s, console
            )
    wall = time.monotonic() - started
    ordered = [assets[v.id] for v in scene.views]
    result = SceneDemoResult(
        scene_id=scene_id, trace_id=trace_id, out_dir=out_dir, scene=scene, views=ordered,
        wall_s=wall,
    )  # fmt: skip
    result.files = _write_scene(settings, scene, images, assets, out_dir)
    return result


async def _follow_scene(
    sub: Subscriber,
    scene_id: str,
    ids: set[str],
    steps: int,
    timeout_s: float,
    console: Console,
) -> tuple[SceneReadyEvent, dict[str, ImageReadyEvent], dict[str, AssetReadyEvent]]:
    """Show progress until the scene-ready event arrives; fail on a dead-lettered view."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )
    images: dict[str, ImageReadyEvent] = {}
    assets: dict[str, AssetReadyEvent] = {}
    steps_done: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    with Progress(*columns, console=console, transient=False) as progress:
        denoise = progress.add_task(f"denoising {len(ids)} views", total=steps)
        segment = progress.add_task("segmenting, depth, .glb", total=len(ids))
        while True:
            if time.monotonic() > deadline:
                raise DemoFailed(f"no scene-ready event within {timeout_s:.0f}s")
            for _topic, event in await sub.next_events(0.5):
                if isinstance(event, SceneReadyEvent) and event.scene_id == scene_id:
                    missing = {v.id for v in event.views} - set(assets)
                    if not missing:
                        return event, images, assets
                elif isinstance(event, DeadLetterEvent) and event.id in ids:
                    raise DemoFailed(
                        f"view {event.id} dead-lettered: {event.error.type}: {event.error.message}"
                    )
                elif isinstance(event, ProgressEvent) and event.id in ids:
                    steps_done[event.id] = max(steps_done.get(event.id, 0), event.step)
                    progress.update(denoise, completed=min(steps_done.values()))
                elif isinstance(event, ImageReadyEvent) and event.id in ids:
                    images[event.id] = event
                    progress.update(denoise, completed=steps)
                elif isinstance(event, AssetReadyEvent) and event.id in ids:
                    assets.setdefault(event.id, event)
                    progress.update(segment, completed=len(assets))


def _write_scene(
    settings: Settings,
    scene: SceneReadyEvent,
    images: dict[str, ImageReadyEvent],
    assets: dict[str, AssetReadyEvent],
    out_dir: Path,
) -> list[Path]:
    """Per view ``view-{angle}/``: image, depth PNG, .glb, masks and RGBA assets; then the
    scene's contact sheet, ``scene.json`` and ``events.json``."""
    from seg_worker.depth import decode_depth_png

    blob = BlobStore.from_url(settings.blob_url)
    limit = settings.max_image_pixels
    files: list[Path] = []

    def save(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(path)

    rows: list[tuple[str, list[tuple[str, Image.Image | None]]]] = []
    for view in scene.views:
        folder = out_dir / f"view-{_slug(view.view)}"
        event = assets[view.id]
        image_data = blob.get(view.image)
        save(folder / "image.png", image_data)
        image = decode_image(image_data, max_pixels=limit)
        depth_tile = None
        if view.depth is not None:
            depth_data = blob.get(view.depth)
            save(folder / "depth.png", depth_data)
            near_is_bright = 1.0 - decode_depth_png(depth_data, max_pixels=limit).normalised()
            depth_tile = colorize_heatmap(near_is_bright, image.size)
        if view.mesh is not None:
            save(folder / "view.glb", blob.get(view.mesh))
        tiles: list[tuple[str, Image.Image | None]] = [
            (f"view {view.view}", image), ("depth (near = bright)", depth_tile)
        ]  # fmt: skip
        for k, (mask_ref, item) in enumerate(zip(event.masks, event.assets, strict=False)):
            name = f"{k}-{_slug(item.label)}"
            mask_data, asset_data = blob.get(mask_ref), blob.get(item.asset)
            save(folder / f"mask-{name}.png", mask_data)
            save(folder / f"asset-{name}.png", asset_data)
            depth_note = f" d={item.depth_median:.2f}" if item.depth_median is not None else ""
            tiles.append((f"{item.label}{depth_note}", on_checkerboard(
                decode_image(asset_data, max_pixels=limit, mode="RGBA")
            )))  # fmt: skip
        rows.append((f"{view.view}", tiles))
    sheet_path = out_dir / "contact_sheet.png"
    scene_sheet(rows).save(sheet_path)
    files.append(sheet_path)
    save(out_dir / "scene.json", scene.model_dump_json(indent=2).encode())
    dump = {
        "images": {k: v.model_dump(mode="json") for k, v in images.items()},
        "assets": {k: v.model_dump(mode="json") for k, v in assets.items()},
    }
    save(out_dir / "events.json", json.dumps(dump, indent=2).encode())
    return files


def scene_sheet(rows: list[tuple[str, list[tuple[str, Image.Image | None]]]]) -> Image.Image:
    """One row per view: captioned tiles (image, depth, assets...) of TILE pixels."""
    columns = max((len(tiles) for _, tiles in rows), default=1)
    width = PAD + columns * (TILE + PAD)
    height = PAD + len(rows) * (TILE + LABEL_H + PAD)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (_name, tiles) in enumerate(rows):
        top = PAD + r * (TILE + LABEL_H + PAD)
        for c, (caption, tile) in enumerate(tiles):
            left = PAD + c * (TILE + PAD)
            draw.text((left, top), caption, fill=(0, 0, 0))
            if tile is None:
                box = (left, top + LABEL_H, left + TILE - 1, top + LABEL_H + TILE - 1)
                draw.rectangle(box, outline=(200, 200, 200))
                continue
            scale = TILE / max(tile.size)  # nearest when enlarging: tiny images stay crisp
            resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
            fitted = tile.convert("RGB").resize(
                (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), resample
            )
            sheet.paste(fitted, (left, top + LABEL_H))
    return sheet
