"""``genseg up``: a whole local stack in one process.

The embedded broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` is set), the topics, one
generator, one segmenter (with the scene stage), the webhook dispatcher and the HTTP
gateway with its gallery, until Ctrl-C or SIGTERM; then everything stops in reverse
order, each runtime draining its work in flight.

The dispatcher signs with ``GENSEG_WEBHOOK_SECRET``; without one, this local stack makes
a secret for the run and says so (in a deployment the dispatcher refuses to start
without it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from consumers.runtime import StageRuntime
from genseg.gateway import Gateway, GatewayConfig
from genseg.workers import build_runtimes, running
from plumbing.broker import EmbeddedBroker
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings

#: One process, fresh groups: a short session so tansu completes each join in seconds.
QUICK_JOIN: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    "create_topics": False,
}

Step = Callable[[str], contextlib.AbstractContextManager[object]]


@dataclass
class Stack:
    """A running local stack (what the caller prints)."""

    settings: Settings
    gateway: Gateway
    runtimes: list[StageRuntime]
    #: The embedded broker, when the stack started one.
    broker: EmbeddedBroker | None
    #: The webhook secret made for this run, when the environment named none.
    made_secret: str | None


@contextlib.contextmanager
def _on_a_broker(
    settings: Settings, log_dir: Path
) -> Iterator[tuple[Settings, EmbeddedBroker | None]]:
    """``settings`` on the broker of ``KAFKA_BOOTSTRAP_SERVERS`` when set, else on an
    embedded broker started for the block."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield settings, None
        return
    broker = EmbeddedBroker(log_path=log_dir / "genseg-broker.log")
    broker.start()
    try:
        servers = {"kafka_bootstrap_servers": broker.bootstrap_servers}
        yield settings.model_copy(update=servers), broker
    finally:
        broker.stop()


def _with_secret(settings: Settings) -> tuple[Settings, str | None]:
    if settings.webhook_secret is not None and settings.webhook_secret.get_secret_value():
        return settings, None
    made = secrets.token_urlsafe(24)
    return settings.model_copy(update={"webhook_secret": SecretStr(made)}), made


@contextlib.asynccontextmanager
async def local_stack(
    settings: Settings,
    host: str,
    port: int,
    *,
    db_path: str,
    log_dir: Path,
    partitions: int = 2,
    step: Step | None = None,
) -> AsyncIterator[Stack]:
    """Start the stack (see the module docstring); stop all of it when the block ends.

    ``step(what)`` wraps each start-up step (e.g. a spinner on the terminal).
    """
    step = step or (lambda _what: contextlib.nullcontext())
    settings, made_secret = _with_secret(settings)
    with contextlib.ExitStack() as exits:
        with step("starting the broker"):
            settings, broker = exits.enter_context(_on_a_broker(settings, log_dir))
        await ensure_topics(settings, partitions=partitions)
        runtimes = [
            *build_runtimes("gen", settings, **QUICK_JOIN),
            *build_runtimes("seg", settings, **QUICK_JOIN),
            *build_runtimes("webhook", settings, **QUICK_JOIN),
        ]
        async with running(runtimes, while_starting=step(f"loading {settings.models} models")):
            gateway = Gateway(settings, host, port, config=GatewayConfig(db_path=db_path))
            with step("starting the gateway"):
                await gateway.start()
            try:
                yield Stack(settings, gateway, runtimes, broker, made_secret)
            finally:
                await gateway.stop()
