"""The benchmarks' Kafka clients, each in a process of its own that loads no model code.

A bench starts one with :func:`client_process` and talks to it in JSON lines: it
writes the client's settings and requests as the first line of the client's stdin;
the client connects its publisher and subscriber and prints ``"ready"``; on ``"go"``
it does its work and prints its reply. Only the client side of genseg is imported
here (settings, schemas, publisher, subscriber), so a client starts in about a second.
A ``multiprocessing`` "spawn" child re-imports the parent's main script, and the bench
scripts' torch and diffusers imports took about 15 s of each client's start on the
2-core machine.

Roles:

- ``batch``: publish every request at once, then read image-ready events until each
  request has one; reply with the seconds from the first publish.
- ``assets``: the same, through the segmenter too: read asset-ready events until each
  request has one; reply with ``[seconds from the first publish, objects cut out]``.
- ``paced``: one request at a time: publish, read its image-ready event, then the next;
  reply with ``[seconds end to end, seconds of the handler's phases]`` per request.
- ``poll``: publish nothing; poll the image-ready and dead-letter topics until
  ``"stop"`` (what a waiting client costs the machine); no reply.

    python -m bench.clients batch|assets|paced|poll   # run by client_process, not by hand
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

from consumers.subscriber import Subscriber
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import AssetReadyEvent, Event, ImageReadyEvent, PromptEvent

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("batch", "assets", "paced", "poll")
#: The settings a client needs; the rest are the client's environment's, as for any client.
CLIENT_FIELDS = {"kafka_bootstrap_servers", "topic_prefix", "blob_url"}
E = TypeVar("E", bound=Event)


class Client:
    """A started client process (see the module doc)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, message: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def receive(self, timeout_s: float) -> Any:
        """The client's next line, decoded; fails if it exits or says nothing in time."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"the client exited ({code}) without replying; see its stderr")
        return json.loads(line)

    async def go(self, timeout_s: float) -> Any:
        """Start its work; its reply."""
        await self.send("go")
        return await self.receive(timeout_s)


@contextlib.asynccontextmanager
async def client_process(
    role: str, settings: Settings, events: list[PromptEvent], timeout_s: float
) -> AsyncIterator[Client]:
    """A ``role`` client, connected and ready on entry; told to stop and joined on exit
    (killed if it has not exited 30 s later)."""
    if role not in ROLES:
        raise ValueError(f"unknown client role {role!r}; one of {ROLES}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.clients", role, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    client = Client(process)
    try:
        await client.send(
            {
                "settings": settings.model_dump(include=CLIENT_FIELDS),
                "events": [e.model_dump(mode="json") for e in events],
            }
        )
        if (said := await client.receive(timeout_s)) != "ready":
            raise RuntimeError(f"the client said {said!r}, not 'ready'")
        yield client
    finally:
        if process.returncode is None:
            with contextlib.suppress(ConnectionError):
                await client.send("stop")
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


# --- the client process -----------------------------------------------------------------


async def _outcomes(sub: Subscriber, wanted: set[str], kind: type[E]) -> dict[str, E]:
    """The ``kind`` event of each id in ``wanted``, read until every one has one; any
    other event for those ids (a dead letter) fails the run."""
    found: dict[str, E] = {}
    while len(found) < len(wanted):
        for topic, event in await sub.next_events(0.2):
            if getattr(event, "id", None) not in wanted:
                continue
            if not isinstance(event, kind):
                raise RuntimeError(f"{topic}: {event}")
            found[event.id] = event
    return found


async def _publish(sub: Subscriber, pub: Publisher, prompts: list[PromptEvent]) -> float:
    """Publishes every prompt at once; ``time.perf_counter()`` before the first."""
    started = time.perf_counter()
    topic = sub.settings.topics.prompts
    await asyncio.gather(*(pub.publish(topic, e) for e in prompts))
    return started


async def _batch(sub: Subscriber, pub: Publisher, prompts: list[PromptEvent]) -> float:
    started = await _publish(sub, pub, prompts)
    await _outcomes(sub, {e.id for e in prompts}, ImageReadyEvent)
    return time.perf_counter() - started


async def _assets(sub: Subscriber, pub: Publisher, prompts: list[PromptEvent]) -> tuple[float, int]:
    started = await _publish(sub, pub, prompts)
    ready = await _outcomes(sub, {e.id for e in prompts}, AssetReadyEvent)
    return time.perf_counter() - started, sum(len(e.assets) for e in ready.values())


async def _paced(
    sub: Subscriber, pub: Publisher, prompts: list[PromptEvent]
) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for prompt in prompts:
        started = time.perf_counter()
        await pub.publish(sub.settings.topics.prompts, prompt)
        ready = (await _outcomes(sub, {prompt.id}, ImageReadyEvent))[prompt.id]
        out.append((time.perf_counter() - started, sum(ready.timings_ms.values()) / 1e3))
    return out


async def _run(role: str, stdin: TextIO, stdout: TextIO) -> None:
    setup = json.loads(stdin.readline())
    settings = Settings(**setup["settings"])
    prompts = [PromptEvent.model_validate(e) for e in setup["events"]]

    def say(message: Any) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    topics = ["assets" if role == "assets" else "images", "dlq"]
    async with Subscriber(settings, topics) as sub, Publisher(settings) as pub:
        say("ready")
        told = asyncio.ensure_future(asyncio.to_thread(stdin.readline))
        if role == "poll":
            while not told.done():
                await sub.next_events(0.2)
            return
        if (line := await told) == "" or json.loads(line) != "go":
            return  # told to stop, or the bench is gone
        work = {"batch": _batch, "assets": _assets, "paced": _paced}[role]
        say(await work(sub, pub, prompts))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    [role] = sys.argv[1:] or [""]
    if role not in ROLES:
        sys.exit(f"usage: python -m bench.clients {'|'.join(ROLES)}")
    # The protocol owns stdout: anything else printed goes to stderr.
    stdout, sys.stdout = sys.stdout, sys.stderr
    asyncio.run(_run(role, sys.stdin, stdout))


if __name__ == "__main__":
    main()
