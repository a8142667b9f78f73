"""``genseg demo --scene``: several views of one scene, their cut-outs, depth maps and
.glb files, and the one scene-ready event.

Runs like the single-request demo (:mod:`genseg.demo`): the embedded broker unless
``KAFKA_BOOTSTRAP_SERVERS`` is set, then a generator, a segmenter and the scene stage in
this process. The views are submitted together and share their parameters (the seed
too), so the generator draws them as one batch.

The scene stage's merged scene ``.glb`` (every object once, placed where its views
agree; metric depth only, e.g. the ``toy`` profile) is saved as ``scene.glb``, and the
contact sheet ends with a top view of it: each object at its fused position, the
cameras of the views around.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry import trace
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress

from consumers.subscriber import Subscriber
from genseg.contact_sheet import LABEL_H, PAD, TILE, colorize_heatmap, on_checkerboard
from genseg.demo import QUICK_JOIN, DemoFailed, DemoRun, progress_columns, slug
from genseg.workers import build_runtimes, running
from plumbing.blobstore import BlobStore
from plumbing.images import decode_image
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from plumbing.telemetry import TRACER_NAME
from producers.client import GensegClient, new_request_id
from schemas import (
    AssetReadyEvent,
    DeadLetterEvent,
    ImageReadyEvent,
    ProgressEvent,
    SceneReadyEvent,
)


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
    prompt: str, views: list[float], targets: list[str], run: DemoRun
) -> SceneDemoResult:
    """Generate ``prompt`` from each angle of ``views`` (one batch on the generator), cut
    out ``targets``, estimate depth, export each view as a .glb, and wait for the one
    scene-ready event; write everything under ``run.out_dir``."""
    prompt = scene_prompt(prompt, targets)
    run.console.print(f"scene prompt: [bold]{prompt}[/]")
    with run.on_a_broker() as run:
        return await _run_scene(prompt, views, targets, run)


def scene_prompt(prompt: str, targets: list[str]) -> str:
    """``prompt`` naming every target: the generator's heat maps (and so the cut-outs)
    follow the target's words in the prompt, e.g. "modern living room, with a sofa"."""
    missing = [t for t in targets if t.lower() not in prompt.lower()]
    return f"{prompt}, with " + " and ".join(f"a {t}" for t in missing) if missing else prompt


async def _run_scene(
    prompt: str, views: list[float], targets: list[str], run: DemoRun
) -> SceneDemoResult:
    settings, console, tracer_provider = run.settings, run.console, run.tracer_provider
    await ensure_topics(settings, partitions=1)
    # The views arrive together and share their parameters: one generator batch.
    runtimes = [
        *build_runtimes("gen", settings, max_batch=max(4, len(views)),
                        max_wait_ms=500, tracer_provider=tracer_provider, **QUICK_JOIN),
        *build_runtimes("seg", settings, tracer_provider=tracer_provider, **QUICK_JOIN),
    ]  # fmt: skip
    scene_id = new_request_id("scene")
    tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    async with running(runtimes, while_starting=run.loading()):
        started = time.monotonic()
        topics = ["images", "assets", "dlq", "scenes", "progress"]
        async with Subscriber(settings, topics) as sub:
            with tracer.start_as_current_span("genseg demo --scene") as root:
                trace_id = f"{root.get_span_context().trace_id:032x}"
                async with GensegClient(settings, tracer_provider=tracer_provider) as client:
                    ids = await client.submit_views(
                        prompt, views=views, scene_id=scene_id, targets=targets,
                        width=run.size, height=run.size, steps=run.steps, seed=run.seed,
                        segmentation={"min_confidence": run.min_confidence},
                    )  # fmt: skip
            console.print(
                f"submitted scene [bold]{scene_id}[/]: {len(ids)} views (trace {trace_id})"
            )
            scene, images, assets = await _follow_scene(
                sub, scene_id, set(ids), run.steps, run.timeout_s, console
            )
    wall = time.monotonic() - started
    ordered = [assets[v.id] for v in scene.views]
    result = SceneDemoResult(
        scene_id=scene_id, trace_id=trace_id, out_dir=run.out_dir, scene=scene, views=ordered,
        wall_s=wall,
    )  # fmt: skip
    result.files = _write_scene(settings, scene, images, assets, run.out_dir)
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
    images: dict[str, ImageReadyEvent] = {}
    assets: dict[str, AssetReadyEvent] = {}
    steps_done: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    with Progress(*progress_columns(), console=console, transient=False) as progress:
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
        folder = out_dir / f"view-{slug(view.view)}"
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
            name = f"{k}-{slug(item.label)}"
            mask_data, asset_data = blob.get(mask_ref), blob.get(item.asset)
            save(folder / f"mask-{name}.png", mask_data)
            save(folder / f"asset-{name}.png", asset_data)
            depth_note = f" d={item.depth_median:.2f}" if item.depth_median is not None else ""
            tiles.append((f"{item.label}{depth_note}", on_checkerboard(
                decode_image(asset_data, max_pixels=limit, mode="RGBA")
            )))  # fmt: skip
        rows.append((f"{view.view}", tiles))
    merged = _merged_glb(blob, scene)
    if merged is not None:
        save(out_dir / "scene.glb", merged)
        rows.append(("scene", [("merged scene, top view", top_view(merged, scene))]))
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


def _merged_glb(blob: BlobStore, scene: SceneReadyEvent) -> bytes | None:
    """The scene stage's merged ``.glb``; None when the scene got none (relative depth)."""
    return blob.get(scene.mesh, max_bytes=1 << 26) if scene.mesh is not None else None


def top_view(glb: bytes, scene: SceneReadyEvent, size: int = 256) -> Image.Image:
    """The merged scene seen from above: each object a disc of its texture's mean colour
    at its fused position (x right, z down), named; the views' cameras as dots on the
    rim, in the direction they look from."""
    from scene_worker.merge import read_scene_objects

    objects = read_scene_objects(glb)
    picture = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(picture)
    reach = max([2.0, *(math.hypot(o.position[0], o.position[2]) + 0.6 for o in objects)])
    scale = (size / 2 - 16) / reach

    def at(x: float, z: float) -> tuple[float, float]:
        return size / 2 + x * scale, size / 2 + z * scale

    for view in scene.views:
        if view.angle is not None:
            a = math.radians(view.angle)
            cx, cy = at(math.sin(a) * reach, math.cos(a) * reach)
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=(90, 90, 90))
            draw.text((cx + 6, cy - 6), view.view, fill=(60, 60, 60))
    for obj in objects:
        cx, cy = at(obj.position[0], obj.position[2])
        r = max(6.0, 0.4 * scale)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=obj.colour, outline=(0, 0, 0))
        draw.text((cx - r, cy + r + 2), obj.label, fill=(0, 0, 0))
    return picture


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
