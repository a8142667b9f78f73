"""Commands that open genseg over HTTP: the gateway alone (``serve``) and a whole local
stack (``up``). The gateway never imports torch; ``up`` loads models like a worker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from genseg.cli.common import (
    LogLevel,
    Profile,
    console,
    err_console,
    reach_broker,
    settings,
    setup_logging,
)

if TYPE_CHECKING:
    from genseg.stack import Stack
    from plumbing.settings import Settings

Listen = Annotated[str, typer.Option(help="HOST:PORT to listen on ([::1]:PORT for IPv6).")]
Db = Annotated[
    Path | None,
    typer.Option(help="The gateway's view of the topics, a SQLite file (rebuilt when lost)."),
]


def _listen(listen: str) -> tuple[str, int]:
    from genseg.gateway import parse_listen

    try:
        return parse_listen(listen)
    except ValueError:
        err_console.print(f"[red]--listen must be HOST:PORT, got {listen!r}[/]")
        raise typer.Exit(2) from None


def serve(
    listen: Listen = "127.0.0.1:8080",
    db: Db = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run the HTTP gateway and gallery against KAFKA_BOOTSTRAP_SERVERS and GENSEG_BLOB_URL
    (docs/gateway.md); several may run side by side. Until SIGTERM or Ctrl-C."""
    setup_logging(log_level)
    host, port = _listen(listen)
    gateway_settings = settings()
    asyncio.run(_serve(gateway_settings, host, port, db))


async def _serve(gateway_settings: Settings, host: str, port: int, db: Path | None) -> None:
    from genseg.gateway import DEFAULT_DB, GatewayConfig
    from genseg.gateway import serve as serve_gateway

    await reach_broker(gateway_settings)  # said at once, in one line
    config = GatewayConfig(db_path=str(db or DEFAULT_DB))
    await serve_gateway(
        gateway_settings, host, port, config=config,
        on_ready=lambda gw: console.print(f"gateway and gallery on [bold]{gw.url}[/]"),
    )  # fmt: skip


def up(
    listen: Listen = "127.0.0.1:8080",
    models: Annotated[Profile, typer.Option(help="Model profile of the workers.")] = Profile.toy,
    db: Db = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """A whole local stack in one command: the embedded broker (unless
    KAFKA_BOOTSTRAP_SERVERS is set), a generator, a segmenter, the webhook dispatcher
    and the gateway; prints the gallery's URL. Ctrl-C stops it all cleanly."""
    setup_logging(log_level)
    host, port = _listen(listen)
    blob_url = os.environ.get("GENSEG_BLOB_URL") or "genseg-blobs"
    stack_settings = settings(models=models.value, blob_url=blob_url)
    asyncio.run(_up(stack_settings, host, port, db))


async def _up(stack_settings: Settings, host: str, port: int, db: Path | None) -> None:
    from consumers.runtime import until_signalled
    from genseg.stack import local_stack
    from genseg.workers import settle_gc_for_serving

    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        await reach_broker(stack_settings)
    log_dir = (
        Path(stack_settings.blob_url).parent if "://" not in stack_settings.blob_url else Path()
    )
    async with local_stack(
        stack_settings, host, port, db_path=str(db or "genseg-gateway.sqlite3"),
        log_dir=log_dir, step=console.status,
    ) as stack:  # fmt: skip
        settle_gc_for_serving()  # the models are loaded: a long-lived process from here
        _ready(stack)
        await until_signalled()
    console.print("stopped")


def _ready(stack: Stack) -> None:
    where = stack.broker.bootstrap_servers if stack.broker else "KAFKA_BOOTSTRAP_SERVERS"
    console.print(f"broker [bold]{where}[/], models [bold]{stack.settings.models}[/]")
    if stack.made_secret:
        console.print(
            f"webhooks signed with a secret made for this run: {stack.made_secret} "
            "(set GENSEG_WEBHOOK_SECRET to choose one)",
            soft_wrap=True,
        )
    console.print(f"gallery on [bold]{stack.gateway.url}[/] (Ctrl-C to stop)", soft_wrap=True)
