"""The ``genseg`` command line.

Heavy modules (torch, diffusers, segment-anything) are imported only inside the
commands that need them, so ``genseg submit`` starts in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from plumbing.settings import Settings

app = typer.Typer(
    name="genseg",
    help="Stream-scale image generation and object cut-outs on Kafka.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
topics_app = typer.Typer(help="Manage the contract's topics.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and replay the dead-letter topic.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")

console = Console()
err_console = Console(stderr=True)


class WorkerKind(StrEnum):
    gen = "gen"
    seg = "seg"
    scene = "scene"


class Profile(StrEnum):
    tiny = "tiny"
    toy = "toy"
    random = "random"
    pretrained = "pretrained"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


def _settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the command's flags on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        err_console.print(f"[red]invalid settings:[/] {exc}")
        raise typer.Exit(2) from None


LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="GENSEG_LOG_LEVEL", help="DEBUG, INFO, WARNING...")
]


@app.command()
def demo(
    prompt: Annotated[
        str | None, typer.Argument(help="What to generate (optional with --scene).")
    ] = None,
    target: Annotated[list[str], typer.Option("--target", "-t", help="Object to cut out.")] = [],  # noqa: B006
    scene: Annotated[
        str | None,
        typer.Option(help="A multi-view scene to generate: views, depth maps and .glb files."),
    ] = None,
    views: Annotated[
        str, typer.Option(help="Viewing angles of --scene in degrees, comma-separated.")
    ] = "0,45,90,135",
    models: Annotated[Profile, typer.Option(help="Model profile.")] = Profile.tiny,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("genseg-out"),
    size: Annotated[
        int | None, typer.Option(help="Image side (default 128 tiny, 64 toy, 512 else).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    seed: Annotated[int, typer.Option(help="Seed (same seed, same image).")] = 7,
    min_confidence: Annotated[
        float | None, typer.Option(help="Mask filter (default 0 for tiny/random, 0.8 else).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the outcome.")] = 600.0,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run the whole pipeline in one process and write image, masks, assets and a contact sheet.

    With --scene: one image per angle of --views (batched on the generator), their
    cut-outs, depth maps and .glb files, and the scene's contact sheet.
    """
    _setup_logging(log_level)
    from genseg.demo import DemoFailed, run_demo
    from plumbing.telemetry import setup_tracing, shutdown_tracing

    if (prompt is None) == (scene is None):
        err_console.print("[red]give a PROMPT, or --scene (not both)[/]")
        raise typer.Exit(2)
    blob_url = os.environ.get("GENSEG_BLOB_URL") or str(out / "blobs")
    settings = _settings(models=models.value, blob_url=blob_url)
    if scene is not None:
        _scene_demo(scene, views, list(target), settings=settings, out=out, size=size,
                    steps=steps, seed=seed, min_confidence=min_confidence, timeout=timeout,
                    models=models)  # fmt: skip
        return
    assert prompt is not None
    provider = setup_tracing("genseg-demo")
    try:
        result = asyncio.run(
            run_demo(prompt, list(target), settings=settings, out_dir=out, size=size,
                     steps=steps, seed=seed, min_confidence=min_confidence,
                     timeout_s=timeout, console=console,
                     tracer_provider=provider)
        )  # fmt: skip
    except DemoFailed as exc:
        err_console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        shutdown_tracing()
    table = Table(title=f"request {result.request_id}: {result.status}")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    for name, ms in result.timings_ms.items():
        table.add_row(name, f"{ms:.1f}")
    table.add_row("[bold]end to end (wall)[/]", f"{result.wall_s * 1000:.0f}")
    console.print(table)
    console.print(f"trace id [bold]{result.trace_id}[/]")
    for path in result.files:
        console.print(f"  wrote {path}")
    if models is Profile.tiny:
        console.print(
            "[yellow]Note:[/] the tiny profile uses random weights: the image is noise and the "
            "masks are arbitrary. Everything else is real (broker, workers, events, blobs). "
            'Use [bold]--models toy[/] with a toy prompt ("a red circle next to a blue '
            'square") for trained models, [bold]--models pretrained[/] with SD_MODEL and '
            "SAM_CHECKPOINT for real output."
        )
    elif models is Profile.toy:
        console.print(
            "[yellow]Note:[/] the toy profile knows only its synthetic world: one to three "
            "circles, squares, triangles or stars in red, green, blue, yellow or purple."
        )


def _scene_demo(
    scene: str,
    views: str,
    targets: list[str],
    *,
    settings: Settings,
    out: Path,
    size: int | None,
    steps: int | None,
    seed: int,
    min_confidence: float | None,
    timeout: float,
    models: Profile,
) -> None:
    """``genseg demo --scene``: run the scene demo and print what it made."""
    from genseg.demo import DemoFailed, run_scene_demo
    from plumbing.telemetry import setup_tracing, shutdown_tracing

    try:
        angles = [float(a) for a in views.split(",") if a.strip()]
    except ValueError:
        err_console.print(f"[red]--views must be comma-separated degrees, got {views!r}[/]")
        raise typer.Exit(2) from None
    if not 1 <= len(angles) <= 64 or len(set(angles)) != len(angles):
        err_console.print(f"[red]--views needs 1 to 64 distinct angles, got {views!r}[/]")
        raise typer.Exit(2)
    provider = setup_tracing("genseg-demo")
    try:
        result = asyncio.run(
            run_scene_demo(scene, angles, targets, settings=settings, out_dir=out, size=size,
                           steps=steps, seed=seed, min_confidence=min_confidence,
                           timeout_s=timeout, console=console, tracer_provider=provider)
        )  # fmt: skip
    except DemoFailed as exc:
        err_console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        shutdown_tracing()
    table = Table(title=f"scene {result.scene_id}: {len(result.views)} views")
    for column in ("view", "status", "objects (median depth)", "seg.depth ms", "seg.mesh ms"):
        table.add_column(column, justify="right" if "ms" in column else "left")
    for view, event in zip(result.scene.views, result.views, strict=True):
        objects = ", ".join(
            f"{a.label} ({a.depth_median:.2f})" if a.depth_median is not None else a.label
            for a in event.assets
        )
        t = event.timings_ms
        table.add_row(view.view, event.status, objects or "-",
                      f"{t.get('seg.depth', 0):.1f}", f"{t.get('seg.mesh', 0):.1f}")  # fmt: skip
    console.print(table)
    console.print(f"end to end (wall) {result.wall_s:.1f} s, trace id [bold]{result.trace_id}[/]")
    for path in result.files:
        console.print(f"  wrote {path}")
    if models is Profile.tiny:
        console.print(
            "[yellow]Note:[/] the tiny profile uses random weights: images are noise, masks and "
            "depth arbitrary. Everything else is real (broker, workers, events, blobs, .glb)."
        )


@app.command("train-toy")
def train_toy(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory of the weights: sd/ and sam.safetensors (default: toy/weights)."
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="A few steps of each (a smoke test of the loops, useless weights).")
    ] = False,
) -> None:
    """Train the toy profile's models on the synthetic world, on the CPU (about 40 minutes).

    Runs ``python -m toy.train_gen`` (VAE, text encoder, UNet) then ``python -m
    toy.train_sam`` with their default recipes, which reproduce the shipped weights.
    """
    from toy import train_gen, train_sam
    from toy.weights import SD_DIR

    # The package's own weights directory, wherever the command runs from.
    out = out or SD_DIR.parent
    started = time.monotonic()
    gen_args = ["--out", str(out / "sd")]
    sam_args = ["--out", str(out / "sam.safetensors")]
    if quick:
        gen_args += ["--scenes", "64", "--vae-steps", "4", "--unet-steps", "4", "--log-every", "1"]
        sam_args += ["--scenes", "64", "--steps", "4"]
    console.print(f"[bold]1/2[/] generator -> {out / 'sd'}")
    train_gen.main(gen_args)
    console.print(f"[bold]2/2[/] segment anything -> {out / 'sam.safetensors'}")
    train_sam.main(sam_args)
    console.print(f"trained in {(time.monotonic() - started) / 60:.1f} min")


@app.command()
def broker(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "127.0.0.1:9092",
    storage: Annotated[str, typer.Option(help="memory://tansu/ or s3://bucket/")] = (
        "memory://tansu/"
    ),
    log_level: LogLevel = "INFO",
) -> None:
    """Run the embedded Kafka-protocol broker (tansu) in the foreground."""
    import signal
    import threading

    from plumbing.broker import BrokerError, EmbeddedBroker

    _setup_logging(log_level)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        err_console.print(f"[red]--listen must be HOST:PORT, got {listen!r}[/]")
        raise typer.Exit(2)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    embedded = EmbeddedBroker(host, int(port), storage=storage)
    try:
        embedded.start()
    except BrokerError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"broker ready on [bold]{embedded.bootstrap_servers}[/] (Ctrl-C to stop)")
    try:
        while not stop.wait(0.5):
            if not embedded.running:
                err_console.print("[red]the broker exited[/]")
                raise typer.Exit(1)
    finally:
        embedded.stop()


@app.command()
def worker(
    kind: Annotated[WorkerKind, typer.Argument(help="gen, seg or scene.")],
    concurrency: Annotated[int, typer.Option(help="Batches worked on at once.")] = 1,
    max_batch: Annotated[int | None, typer.Option(help="Records per batch (gen: 4).")] = None,
    max_wait_ms: Annotated[int, typer.Option(help="Longest wait to fill a batch.")] = 20,
    max_in_flight: Annotated[
        int | None,
        typer.Option(
            help="Records held at once, then fetching pauses (default: 2 batches a slot)."
        ),
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics on this port.")] = None,
    instance_id: Annotated[
        str | None, typer.Option(help="Static group membership id (restarts skip a rebalance).")
    ] = None,
    partitions: Annotated[int, typer.Option(help="Partitions of topics it creates.")] = 4,
    create_topics: Annotated[bool, typer.Option(help="Create missing topics at start.")] = True,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to drain on SIGTERM.")] = 30.0,
    job_timeout: Annotated[float, typer.Option(help="Seconds one handler call may take.")] = 900,
    max_attempts: Annotated[int, typer.Option(help="Attempts before dead-lettering.")] = 3,
    torch_threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    scenes: Annotated[
        bool,
        typer.Option(
            "--scenes/--no-scenes",
            help="seg: also run the scene stage (one scene-ready event per scene) in-process.",
        ),
    ] = True,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one worker: a member of the gen, seg or scene consumer group, until SIGTERM.

    ``seg`` also runs the scene stage by default (``--no-scenes`` to deploy it apart as
    ``genseg worker scene``); each is its own consumer group.
    """
    _setup_logging(log_level)
    from consumers.runtime import RuntimeConfig, StageRuntime
    from plumbing.telemetry import setup_tracing, shutdown_tracing

    settings = _settings()
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    if kind is WorkerKind.gen:
        from gen_worker.handler import GenStage

        stage: Any = GenStage(settings)
    elif kind is WorkerKind.seg:
        from seg_worker.handler import SegStage

        stage = SegStage(settings)
    else:
        from scene_worker import SceneStage

        stage = SceneStage(settings)
        concurrency = 1  # one record at a time: see scene_worker/stage.py
    config = RuntimeConfig(
        max_batch=max_batch or (4 if kind is WorkerKind.gen else 1),
        max_wait_ms=max_wait_ms,
        concurrency=concurrency,
        max_in_flight=max_in_flight,
        metrics_port=metrics_port,
        instance_id=instance_id,
        partitions=partitions,
        create_topics=create_topics,
        drain_timeout_s=drain_timeout,
        job_timeout_s=job_timeout,
        max_attempts=max_attempts,
    )
    provider = setup_tracing(f"genseg-{kind.value}")
    runtimes = [StageRuntime(stage, settings, config, tracer_provider=provider)]
    if kind is WorkerKind.seg and scenes:
        from scene_worker import SceneStage

        scene_config = RuntimeConfig(
            instance_id=f"{instance_id}-scene" if instance_id else None,
            partitions=partitions,
            create_topics=create_topics,
            drain_timeout_s=drain_timeout,
            max_attempts=max_attempts,
        )
        runtimes.append(
            StageRuntime(SceneStage(settings), settings, scene_config, tracer_provider=provider)
        )
    try:
        asyncio.run(_serve(runtimes))
    finally:
        shutdown_tracing()


async def _serve(runtimes: list[Any]) -> None:
    """Run the runtimes of one process until SIGTERM or SIGINT, then stop them all."""
    if len(runtimes) == 1:
        await runtimes[0].serve()
        return
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = []
    try:
        for runtime in runtimes:
            await runtime.start()
            started.append(runtime)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await asyncio.gather(*(runtime.stop() for runtime in reversed(started)))


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="Object to cut out.")] = [],  # noqa: B006
    request_id: Annotated[str | None, typer.Option("--id", help="Request id.")] = None,
    width: Annotated[int, typer.Option(help="Multiple of 8, 64..2048.")] = 512,
    height: Annotated[int, typer.Option(help="Multiple of 8, 64..2048.")] = 512,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance_scale: Annotated[float, typer.Option(help="CFG scale.")] = 7.5,
    sampler: Annotated[str, typer.Option(help="dpmpp_2m, dpmpp_2m_karras, euler_a...")] = (
        "dpmpp_2m"
    ),
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    num_images: Annotated[int, typer.Option(help="Images for this prompt.")] = 1,
    mode: Annotated[str, typer.Option(help="attention, boxes, points or auto.")] = "attention",
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and the result.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 600.0,
    log_level: LogLevel = "WARNING",
) -> None:
    """Publish a prompt event; with --wait, follow it to its assets."""
    from pydantic import ValidationError

    from plumbing.telemetry import setup_tracing, shutdown_tracing
    from producers.client import new_request_id
    from schemas import PromptEvent

    _setup_logging(log_level)
    settings = _settings()
    try:
        event = PromptEvent(
            id=request_id or new_request_id(), prompt=prompt, targets=target, width=width,
            height=height, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
            seed=seed, num_images=num_images, segmentation={"mode": mode},
        )  # fmt: skip
    except ValidationError as exc:
        err_console.print(f"[red]invalid request:[/]\n{exc}")
        raise typer.Exit(2) from None
    setup_tracing("genseg-submit")
    try:
        asyncio.run(_submit(settings, event, wait=wait, timeout=timeout))
    finally:
        shutdown_tracing()


async def _submit(settings: Settings, event: Any, *, wait: bool, timeout: float) -> None:
    from consumers.subscriber import Subscriber
    from producers.client import GensegClient

    if not wait:
        async with GensegClient(settings) as client:
            await client.publisher.publish(settings.topics.prompts, event)
        console.print(event.id)
        return
    from rich.progress import BarColumn, Progress, TextColumn

    from schemas import AssetReadyEvent, DeadLetterEvent, ProgressEvent

    topics = ["progress", "assets", "dlq"]
    async with Subscriber(settings, topics, only_key=event.id) as sub:
        async with GensegClient(settings) as client:
            await client.publisher.publish(settings.topics.prompts, event)
        console.print(f"submitted [bold]{event.id}[/]")
        outcomes: dict[int, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with Progress(TextColumn("{task.description}"), BarColumn(), console=console) as bar:
            task = bar.add_task("denoising", total=event.steps)
            while len(outcomes) < event.num_images:
                if loop.time() > deadline:
                    err_console.print(f"[red]no outcome within {timeout:.0f}s[/]")
                    raise typer.Exit(1)
                for _topic, ev in await sub.next_events(0.5):
                    if isinstance(ev, ProgressEvent):
                        bar.update(task, completed=ev.step, total=ev.steps)
                    elif isinstance(ev, AssetReadyEvent):
                        outcomes.setdefault(ev.image_index, ev)
                    elif isinstance(ev, DeadLetterEvent):
                        for i in (
                            range(event.num_images) if ev.image_index is None else [ev.image_index]
                        ):
                            outcomes.setdefault(i, ev)
    failed = False
    for index in sorted(outcomes):
        ev = outcomes[index]
        if isinstance(ev, DeadLetterEvent):
            failed = True
            reason = f"{ev.error.type}: {ev.error.message}"
            console.print(f"image {index}: [red]dead-lettered[/] {reason}")
            continue
        console.print(f"image {index}: [green]{ev.status}[/]  image {ev.image.uri}")
        for item in ev.assets:
            console.print(f"  {item.label} ({item.score:.2f}) bbox {item.bbox}: {item.asset.uri}")
    if failed:
        raise typer.Exit(1)


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="Short topic name: prompts, images, assets...")],
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest record.")] = False,
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
) -> None:
    """Print events from a topic as they arrive (one JSON object per line)."""
    from schemas import TOPIC_NAMES

    if topic not in TOPIC_NAMES:
        err_console.print(f"[red]unknown topic {topic!r}; one of {', '.join(TOPIC_NAMES)}[/]")
        raise typer.Exit(2)
    settings = _settings()
    try:
        asyncio.run(_tail(settings, topic, from_beginning, limit))
    except KeyboardInterrupt:
        pass


async def _tail(settings: Settings, topic: str, from_beginning: bool, limit: int | None) -> None:
    from plumbing.kafka import make_consumer

    consumer = make_consumer(
        settings,
        settings.topics.name(topic),
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen = 0
    try:
        while limit is None or seen < limit:
            for _tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    text = (record.value or b"").decode("utf-8", "replace")
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
    finally:
        await consumer.stop()


@topics_app.command("create")
def topics_create(
    partitions: Annotated[int, typer.Option(help="Partitions per topic (parallelism cap).")] = 4,
    replication_factor: Annotated[int, typer.Option(help="Replicas per partition.")] = 1,
) -> None:
    """Create the contract's topics (idempotent)."""
    from plumbing.kafka import ensure_topics

    settings = _settings()
    created = asyncio.run(
        ensure_topics(settings, partitions=partitions, replication_factor=replication_factor)
    )
    for name in [*settings.topics.all(), *settings.topics.internal()]:
        state = "created" if name in created else "exists"
        console.print(f"{name}: {state}")


@dlq_app.command("replay")
def dlq_replay(
    request_id: Annotated[str | None, typer.Option("--id", help="Only this request.")] = None,
    include_invalid: Annotated[
        bool, typer.Option(help="Also replay records that failed validation.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="List, do not publish.")] = False,
) -> None:
    """Re-publish dead-lettered requests to their source topic (validation failures skipped)."""
    from genseg.replay import replay_dead_letters

    settings = _settings()
    report = asyncio.run(
        replay_dead_letters(
            settings, request_id=request_id, include_invalid=include_invalid, dry_run=dry_run
        )
    )
    for line in report.lines:
        console.print(line)
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {report.replayed}, skipped {report.skipped}")


@app.command()
def schema(
    asyncapi: Annotated[bool, typer.Option(help="Print the AsyncAPI 3.0 document only.")] = False,
) -> None:
    """Print the JSON Schemas of the contract (and the AsyncAPI document)."""
    from schemas.export import asyncapi_document, json_schemas

    settings = _settings()
    document: Any = asyncapi_document(settings.topics)
    if not asyncapi:
        document = {"schemas": json_schemas(), "asyncapi": document}
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()
