"""What every command shares: consoles, options, logging, settings, reaching the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from genseg.cli.errors import CHECK_THE_BROKER, START_A_BROKER, Failure
from plumbing.settings import Settings

console = Console()
err_console = Console(stderr=True)

#: How long a command waits for the broker to answer before it says there is none.
CONNECT_TIMEOUT_S = 5.0


class Profile(StrEnum):
    tiny = "tiny"
    toy = "toy"
    random = "random"
    pretrained = "pretrained"


LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="GENSEG_LOG_LEVEL", help="DEBUG, INFO, WARNING...")
]


def global_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="GENSEG_DEBUG",
            help="Show the traceback of expected failures too (no broker, missing weights...).",
        ),
    ] = False,
) -> None:
    """Stream-scale image generation and object cut-outs on Kafka."""
    # Read by genseg.cli.errors.ExplainingGroup from the context's parameters.


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
    )
    root = logging.getLogger().level
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root))
    logging.captureWarnings(True)  # Python warnings become log records ("py.warnings")
    if root >= logging.WARNING:
        # Libraries' warnings (deprecations, "Couldn't connect to the Hub...") are for
        # developers, shown from --log-level INFO down; here they would crowd what a
        # failure says in words. diffusers and transformers log through handlers of
        # their own, configured from these variables when first imported; one imported
        # already (by the caller of this command, in-process) is told directly.
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
        for variable, library in (
            ("DIFFUSERS_VERBOSITY", "diffusers"),
            ("TRANSFORMERS_VERBOSITY", "transformers"),
        ):
            if variable in os.environ:
                continue  # the user's choice
            os.environ[variable] = "error"
            if library in sys.modules:
                sys.modules[library].utils.logging.set_verbosity_error()


def settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the command's flags on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        # One line per bad setting, named as the user set it (its environment variable).
        for error in exc.errors(include_url=False):
            name = error["loc"][0] if error["loc"] else "settings"
            err_console.print(
                f"[red]invalid settings:[/] {name}={error.get('input')!r}: {error['msg']}",
                soft_wrap=True,
            )
        raise typer.Exit(2) from None


def bootstrap_addresses(servers: str) -> list[tuple[str, int]]:
    """(host, port) of each entry of ``KAFKA_BOOTSTRAP_SERVERS``; like Kafka clients,
    port 9092 when an entry has none."""
    addresses = []
    for entry in servers.split(","):
        host, colon, port = entry.strip().rpartition(":")
        if not colon:
            host, port = entry.strip(), "9092"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise Failure(
                f"KAFKA_BOOTSTRAP_SERVERS={servers} is not HOST:PORT[,HOST:PORT...]",
                "set it to a broker's address, e.g. 127.0.0.1:9092",
                exit_code=2,
            )
        addresses.append((host, int(port)))
    return addresses


async def reach_broker(settings: Settings, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Make sure a broker answers at ``KAFKA_BOOTSTRAP_SERVERS`` within ``timeout_s``, or
    raise a :class:`Failure` saying why not (bad address, unknown host, nobody there).

    One metadata round trip: milliseconds on a live broker, a bounded wait on a silent one
    (aiokafka's own request timeout is 40 s).
    """
    from aiokafka.errors import KafkaConnectionError

    from plumbing.kafka import make_admin

    addresses = bootstrap_addresses(settings.kafka_bootstrap_servers)
    where = ",".join(f"{host}:{port}" for host, port in addresses)
    admin = make_admin(settings)
    try:
        with _quiet("aiokafka"):
            await asyncio.wait_for(admin.start(), timeout_s)
    except KafkaConnectionError as exc:
        unknown = [host for host, port in addresses if not await _resolves(host, port)]
        if len(unknown) == len(addresses):
            raise Failure(
                f"cannot resolve {', '.join(unknown)} (KAFKA_BOOTSTRAP_SERVERS={where})",
                "fix the host name, or unset it and start a broker here with `genseg broker`",
            ) from exc
        raise Failure(f"no broker at {where}", START_A_BROKER) from exc
    except TimeoutError as exc:
        raise Failure(
            f"the broker at {where} did not answer in {timeout_s:.0f} s", CHECK_THE_BROKER
        ) from exc
    finally:
        with _quiet("aiokafka"):
            await admin.close()


async def _resolves(host: str, port: int) -> bool:
    try:
        await asyncio.get_running_loop().getaddrinfo(host, port)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence ``logger_name`` for the block: its error lines would repeat, less clearly,
    what the failure raised after them says."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
