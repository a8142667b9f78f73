"""Commands that talk to a running broker (submit, tail, topics, dlq), and ``schema``.

Each makes sure a broker answers first (:func:`genseg.cli.common.reach_broker`), so that
a missing one is said in a few seconds and in words. None imports torch.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genseg.cli.common import LogLevel, console, err_console, reach_broker, settings, setup_logging
from genseg.cli.hints import missing_targets_note, target_warnings
from genseg.profiles import request_size
from plumbing.settings import Settings

if TYPE_CHECKING:
    from genseg.replay import ReplayReport
    from schemas import PromptEvent

_SIZE_HELP = (
    "Multiple of 8, 64..2048 (default: 64 when GENSEG_MODELS=toy, the only size its models "
    "draw; else 512)."
)


def submit(
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    target: Annotated[list[str], typer.Option("--target", "-t", help="Object to cut out.")] = [],  # noqa: B006
    request_id: Annotated[str | None, typer.Option("--id", help="Request id.")] = None,
    width: Annotated[int | None, typer.Option(help=_SIZE_HELP)] = None,
    height: Annotated[int | None, typer.Option(help=_SIZE_HELP)] = None,
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
    """Publish a prompt event; with --wait, follow it to its assets.

    Without --width/--height the image is the profile's size (GENSEG_MODELS): 64x64 for
    toy, whose models draw nothing else; the contract's 512x512 otherwise.
    """
    from pydantic import ValidationError

    from plumbing.telemetry import setup_tracing, shutdown_tracing
    from producers.client import new_request_id
    from schemas import PromptEvent

    setup_logging(log_level)
    submit_settings = settings()
    side = request_size(submit_settings.models)
    try:
        event = PromptEvent(
            id=request_id or new_request_id(), prompt=prompt, targets=target,
            width=side if width is None else width, height=side if height is None else height,
            steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
            num_images=num_images, segmentation={"mode": mode},
        )  # fmt: skip
    except ValidationError as exc:
        err_console.print(f"[red]invalid request:[/]\n{exc}")
        raise typer.Exit(2) from None
    for line in target_warnings(prompt, target, mode=mode):
        err_console.print(line, style="yellow", soft_wrap=True, markup=False)
    setup_tracing("genseg-submit")
    try:
        asyncio.run(_submit(submit_settings, event, wait=wait, timeout=timeout))
    finally:
        shutdown_tracing()


async def _submit(settings: Settings, event: PromptEvent, *, wait: bool, timeout: float) -> None:
    from consumers.subscriber import Subscriber
    from producers.client import GensegClient

    await reach_broker(settings)
    if not wait:
        async with GensegClient(settings) as client:
            await client.publisher.publish(settings.topics.prompts, event)
        console.print(event.id)
        return
    from rich.progress import BarColumn, Progress, TextColumn

    from schemas import AssetReadyEvent, DeadLetterEvent, ImageReadyEvent, ProgressEvent

    outcomes: dict[int, Any] = {}
    missing: dict[int, list[str]] = {}  # image -> targets the generator could not find
    async with Subscriber(
        settings, ["progress", "images", "assets", "dlq"], only_key=event.id
    ) as sub:
        async with GensegClient(settings) as client:
            await client.publisher.publish(settings.topics.prompts, event)
        console.print(f"submitted [bold]{event.id}[/]")
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
                    elif isinstance(ev, ImageReadyEvent) and ev.missing_targets:
                        missing[ev.image_index] = list(ev.missing_targets)
                    elif isinstance(ev, AssetReadyEvent):
                        outcomes.setdefault(ev.image_index, ev)
                    elif isinstance(ev, DeadLetterEvent):
                        for i in (
                            range(event.num_images) if ev.image_index is None else [ev.image_index]
                        ):
                            outcomes.setdefault(i, ev)
    _print_outcomes(outcomes, missing)


def _print_outcomes(outcomes: dict[int, Any], missing: dict[int, list[str]]) -> None:
    """One line per image and one per asset; exit 1 when an image was dead-lettered."""
    from schemas import DeadLetterEvent

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
        if index in missing:
            note = missing_targets_note(missing[index], index)
            err_console.print(note, style="yellow", soft_wrap=True, markup=False)
    if failed:
        raise typer.Exit(1)


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
    setup_logging("WARNING")
    tail_settings = settings()
    try:
        asyncio.run(_tail(tail_settings, topic, from_beginning, limit))
    except KeyboardInterrupt:
        pass


async def _tail(settings: Settings, topic: str, from_beginning: bool, limit: int | None) -> None:
    from plumbing.kafka import make_consumer

    await reach_broker(settings)
    consumer = make_consumer(
        settings,
        settings.topics.name(topic),
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
    )
    seen = 0
    try:
        await consumer.start()
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


def topics_create(
    partitions: Annotated[int, typer.Option(help="Partitions per topic (parallelism cap).")] = 4,
    replication_factor: Annotated[int, typer.Option(help="Replicas per partition.")] = 1,
) -> None:
    """Create the contract's topics (idempotent)."""
    setup_logging("WARNING")
    topic_settings = settings()
    created = asyncio.run(_topics_create(topic_settings, partitions, replication_factor))
    for name in [*topic_settings.topics.all(), *topic_settings.topics.internal()]:
        state = "created" if name in created else "exists"
        console.print(f"{name}: {state}")


async def _topics_create(settings: Settings, partitions: int, replication_factor: int) -> list[str]:
    from plumbing.kafka import ensure_topics

    await reach_broker(settings)
    return await ensure_topics(
        settings, partitions=partitions, replication_factor=replication_factor
    )


def dlq_replay(
    request_id: Annotated[str | None, typer.Option("--id", help="Only this request.")] = None,
    include_invalid: Annotated[
        bool, typer.Option(help="Also replay records that failed validation.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="List, do not publish.")] = False,
) -> None:
    """Re-publish dead-lettered requests to their source topic (validation failures skipped)."""
    setup_logging("WARNING")
    replay_settings = settings()
    report = asyncio.run(_dlq_replay(replay_settings, request_id, include_invalid, dry_run))
    for line in report.lines:
        console.print(line, markup=False)
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {report.replayed}, skipped {report.skipped}")


async def _dlq_replay(
    settings: Settings, request_id: str | None, include_invalid: bool, dry_run: bool
) -> ReplayReport:
    from genseg.replay import replay_dead_letters

    await reach_broker(settings)
    return await replay_dead_letters(
        settings, request_id=request_id, include_invalid=include_invalid, dry_run=dry_run
    )


def schema(
    asyncapi: Annotated[bool, typer.Option(help="Print the AsyncAPI 3.0 document only.")] = False,
) -> None:
    """Print the JSON Schemas of the contract (and the AsyncAPI document)."""
    from schemas.export import asyncapi_document, json_schemas

    schema_settings = settings()
    document: Any = asyncapi_document(schema_settings.topics)
    if not asyncapi:
        document = {"schemas": json_schemas(), "asyncapi": document}
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
