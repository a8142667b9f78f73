"""Commands that run something in this process until it is done or stopped: the demo,
the embedded broker, a worker, the toy profile's training.

Heavy modules (torch, diffusers, segment-anything) are imported inside the commands.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from consumers.config import RuntimeConfig
from genseg.cli.common import (
    LogLevel,
    Profile,
    console,
    err_console,
    reach_broker,
    settings,
    setup_logging,
)
from genseg.cli.hints import missing_targets_note, target_warnings
from genseg.profiles import PROFILES
from genseg.workers import WorkerKind
from plumbing.settings import Settings

if TYPE_CHECKING:
    from consumers.runtime import StageRuntime
    from genseg.demo import DemoRun

_TINY_NOTE = (
    "[yellow]Note:[/] the tiny profile uses random weights: the image is noise and the "
    "masks are arbitrary. Everything else is real (broker, workers, events, blobs). "
    'Use [bold]--models toy[/] with a toy prompt ("a red circle next to a blue '
    'square") for trained models, [bold]--models pretrained[/] with SD_MODEL and '
    "SAM_CHECKPOINT for real output."
)
_TOY_NOTE = (
    "[yellow]Note:[/] the toy profile knows only its synthetic world: one to three "
    "circles, squares, triangles or stars in red, green, blue, yellow or purple."
)


def _per_profile(what: str, field: str) -> str:
    """``what``, with its default per profile (genseg.profiles), for a help text."""
    defaults = ", ".join(f"{getattr(d, field):g} {name}" for name, d in PROFILES.items())
    return f"{what} (default: {defaults})."


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
    size: Annotated[int | None, typer.Option(help=_per_profile("Image side", "demo_size"))] = None,
    steps: Annotated[
        int | None, typer.Option(help=_per_profile("Denoising steps", "demo_steps"))
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed (same seed, same image).")] = 7,
    min_confidence: Annotated[
        float | None,
        typer.Option(help=_per_profile("Mask filter", "demo_min_confidence")),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the outcome.")] = 600.0,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run the whole pipeline in one process and write image, masks, assets and a contact sheet.

    With --scene: one image per angle of --views (batched on the generator), their
    cut-outs, depth maps and .glb files, and the scene's contact sheet.
    """
    setup_logging(log_level)
    if (prompt is None) == (scene is None):
        err_console.print("[red]give a PROMPT, or --scene (not both)[/]")
        raise typer.Exit(2)
    angles = _angles(views) if scene is not None else []
    blob_url = os.environ.get("GENSEG_BLOB_URL") or str(out / "blobs")
    demo_settings = settings(models=models.value, blob_url=blob_url)
    # A scene's prompt is made to name every target (genseg.scene_demo.scene_prompt).
    if prompt is not None or not target:
        for line in target_warnings(prompt or "", target, mode_flag=False):
            err_console.print(line, style="yellow", soft_wrap=True, markup=False)
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):  # else the demo starts its own broker
        asyncio.run(reach_broker(demo_settings))
    from genseg.demo import DemoRun
    from plumbing.telemetry import setup_tracing, shutdown_tracing

    run = DemoRun.of(
        demo_settings, out, size=size, steps=steps, seed=seed, min_confidence=min_confidence,
        timeout_s=timeout, console=console, tracer_provider=setup_tracing("genseg-demo"),
    )  # fmt: skip
    try:
        if scene is not None:
            _scene_demo(scene, angles, list(target), run, models)
        else:
            assert prompt is not None
            _demo(prompt, list(target), run, models)
    finally:
        shutdown_tracing()


def _demo(prompt: str, targets: list[str], run: DemoRun, models: Profile) -> None:
    """``genseg demo PROMPT``: run the demo and print what it made."""
    from genseg.demo import run_demo

    result = asyncio.run(run_demo(prompt, targets, run))
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
    if result.missing_targets:
        note = missing_targets_note(result.missing_targets)
        err_console.print(note, style="yellow", soft_wrap=True, markup=False)
    if models is Profile.tiny:
        console.print(_TINY_NOTE)
    elif models is Profile.toy:
        console.print(_TOY_NOTE)


def _angles(views: str) -> list[float]:
    """The angles of ``--views``, checked before anything starts."""
    try:
        angles = [float(a) for a in views.split(",") if a.strip()]
    except ValueError:
        err_console.print(f"[red]--views must be comma-separated degrees, got {views!r}[/]")
        raise typer.Exit(2) from None
    if not 1 <= len(angles) <= 64 or len(set(angles)) != len(angles):
        err_console.print(f"[red]--views needs 1 to 64 distinct angles, got {views!r}[/]")
        raise typer.Exit(2)
    return angles


def _scene_demo(
    scene: str, angles: list[float], targets: list[str], run: DemoRun, models: Profile
) -> None:
    """``genseg demo --scene``: run the scene demo and print what it made."""
    from genseg.scene_demo import run_scene_demo

    result = asyncio.run(run_scene_demo(scene, angles, targets, run))
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


def train_toy(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory of the weights: sd/, sam.safetensors, depth/ and scene_sd/ "
            "(default: toy/weights)."
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            help="A few steps of each, in fp32 (a smoke test of the loops, useless weights)."
        ),
    ] = False,
) -> None:
    """Train the toy profile's models on the synthetic worlds, on the CPU (about 1.5 hours).

    Runs ``python -m toy.train_gen`` (VAE, text encoder, UNet), ``python -m toy.train_sam``
    and the scene path's depth model and scene generator, ``python -m toy.train_depth``
    and ``python -m toy.train_scene`` (on the 3D world), with their default recipes
    (docs/toy.md says which shipped files they reproduce).
    """
    from toy import train_depth, train_gen, train_sam, train_scene
    from toy.weights import SD_DIR

    # The package's own weights directory, wherever the command runs from.
    out = out or SD_DIR.parent
    started = time.monotonic()
    gen_args = ["--out", str(out / "sd")]
    sam_args = ["--out", str(out / "sam.safetensors")]
    depth_args = ["--out", str(out / "depth")]
    scene_args = ["--out", str(out / "scene_sd")]
    if quick:
        # Batches of 4, not the recipes' 32: a step then takes seconds, not half a minute.
        # fp32, not the recipes' bf16: a CPU without bf16 instructions emulates it (a step
        # 5 to 7 times slower on the 2-core Zen 3), and these weights are thrown away.
        small = ["--vae-batch", "4", "--batch", "4", "--log-every", "1", "--precision", "fp32"]
        gen_args += ["--scenes", "64", "--vae-steps", "4", "--unet-steps", "4", *small]
        sam_args += ["--scenes", "64", "--steps", "4"]
        depth_args += ["--random-views", "32", "--canonical-scenes", "4", "--steps", "4",
                       "--eval-views", "4", "--log-every", "1"]  # fmt: skip
        scene_args += ["--scenes", "4", "--vae-steps", "2", "--unet-steps", "2", *small]
    steps = [
        ("generator", out / "sd", train_gen.main, gen_args),
        ("segment anything", out / "sam.safetensors", train_sam.main, sam_args),
        ("depth", out / "depth", train_depth.main, depth_args),
        ("scene generator", out / "scene_sd", train_scene.main, scene_args),
    ]
    for k, (name, path, run, args) in enumerate(steps, 1):
        console.print(f"[bold]{k}/{len(steps)}[/] {name} -> {path}")
        step_started = time.monotonic()
        run(args)
        console.print(f"  {name}: {(time.monotonic() - step_started) / 60:.1f} min")
    console.print(f"trained in {(time.monotonic() - started) / 60:.1f} min")


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

    from plumbing.broker import EmbeddedBroker

    setup_logging(log_level)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        err_console.print(f"[red]--listen must be HOST:PORT, got {listen!r}[/]")
        raise typer.Exit(2)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    embedded = EmbeddedBroker(host, int(port), storage=storage)
    embedded.start()  # a BrokerError is said in words (genseg.cli.errors)
    console.print(f"broker ready on [bold]{embedded.bootstrap_servers}[/] (Ctrl-C to stop)")
    try:
        while not stop.wait(0.5):
            if not embedded.running:
                err_console.print("[red]the broker exited[/]")
                raise typer.Exit(1)
    finally:
        embedded.stop()


def _tuning(help: str, default: object) -> Any:
    """A ``genseg worker`` option for a RuntimeConfig field: None ("not given") unless set,
    so that RuntimeConfig, under the stage's own defaults, decides; the help shows
    what that default is."""
    return typer.Option(help=help, show_default=str(default))


_D = RuntimeConfig


def worker(
    kind: Annotated[WorkerKind, typer.Argument(help="gen, seg, scene or webhook.")],
    concurrency: Annotated[
        int | None, _tuning("Batches worked on at once.", _D.concurrency)
    ] = None,
    max_batch: Annotated[
        int | None, _tuning("Records per batch.", f"the stage's: gen 4, else {_D.max_batch}")
    ] = None,
    max_wait_ms: Annotated[
        int | None, _tuning("Longest wait to fill a batch.", _D.max_wait_ms)
    ] = None,
    max_in_flight: Annotated[
        int | None, _tuning("Records held at once, then fetching pauses.", "2 batches a slot")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics on this port.")] = None,
    instance_id: Annotated[
        str | None, typer.Option(help="Static group membership id (restarts skip a rebalance).")
    ] = None,
    partitions: Annotated[
        int | None, _tuning("Partitions of topics it creates.", _D.partitions)
    ] = None,
    create_topics: Annotated[
        bool | None, _tuning("Create missing topics at start.", _D.create_topics)
    ] = None,
    drain_timeout: Annotated[
        float | None, _tuning("Seconds to drain on SIGTERM.", _D.drain_timeout_s)
    ] = None,
    job_timeout: Annotated[
        float | None, _tuning("Seconds one handler call may take.", _D.job_timeout_s)
    ] = None,
    max_attempts: Annotated[
        int | None, _tuning("Attempts before dead-lettering.", _D.max_attempts)
    ] = None,
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
    """Run one worker: a member of the gen, seg, scene or webhook consumer group(s),
    until SIGTERM.

    ``seg`` also runs the scene stage by default (``--no-scenes`` to deploy it apart as
    ``genseg worker scene``); ``webhook`` runs the dispatcher's two stages (asset-ready
    and dead-letter outcomes, docs/webhooks.md); each is its own consumer group.
    """
    setup_logging(log_level)
    from genseg.workers import build_runtimes
    from plumbing.telemetry import setup_tracing, shutdown_tracing

    worker_settings = settings()
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    provider = setup_tracing(f"genseg-{kind.value}")
    try:
        runtimes = build_runtimes(
            kind, worker_settings, scenes=scenes, forget_deleted=True, tracer_provider=provider,
            concurrency=concurrency, max_batch=max_batch, max_wait_ms=max_wait_ms,
            max_in_flight=max_in_flight, metrics_port=metrics_port, instance_id=instance_id,
            partitions=partitions, create_topics=create_topics, drain_timeout_s=drain_timeout,
            job_timeout_s=job_timeout, max_attempts=max_attempts,
        )  # fmt: skip
        asyncio.run(_serve_worker(worker_settings, runtimes))
    finally:
        shutdown_tracing()


async def _serve_worker(worker_settings: Settings, runtimes: list[StageRuntime]) -> None:
    from genseg.workers import serve

    # Before loading models (minutes for real ones): no broker is said at once.
    await reach_broker(worker_settings)
    await serve(runtimes)
