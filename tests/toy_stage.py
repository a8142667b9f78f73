"""A toy stage for testing the runtime against a real broker, in-process or as a process.

Input: ``Ping`` events on ``{prefix}.prompts``; output: ``Pong`` events on
``{prefix}.images``. Behaviour per event: ``fail_p`` is the chance that an
attempt fails transiently (decided by a seeded hash of id and attempt, so a run
is reproducible), ``block`` names a threading.Event the handler waits on, and
``work_ms`` busy-waits to stand in for model time.

Run as a worker process: ``python -m tests.toy_stage`` with the settings in the
environment (KAFKA_BOOTSTRAP_SERVERS, GENSEG_TOPIC_PREFIX, GENSEG_BLOB_URL) and
``TOY_WORKER`` naming the incarnation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time

from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.stage import ItemResult, Output, Stage, StageContext
from plumbing.settings import Settings
from schemas import Event, parse_event


class Ping(Event):
    id: str
    fail_p: float = 0.0
    block: str | None = None
    work_ms: float = 0.0
    group: str | None = None


class Pong(Event):
    id: str
    worker: str
    attempt: int


class Flaky(Exception):
    """A transient failure the toy handler raises on purpose."""


def fails(request_id: str, attempt: int, fail_p: float) -> bool:
    """Seeded coin toss: does attempt ``attempt`` of ``request_id`` fail?"""
    digest = hashlib.sha256(f"{request_id}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fail_p


class ToyStage(Stage[Ping]):
    name = "toy"
    input_topic = "prompts"

    def __init__(self, worker: str = "w", gates: dict[str, threading.Event] | None = None) -> None:
        self.worker = worker
        self.gates = gates or {}
        self.attempts: dict[str, int] = {}
        self.calls: list[list[str]] = []

    def parse(self, raw: bytes) -> Ping:
        return parse_event(raw, Ping)

    def batch_key(self, event: Ping) -> str | None:
        return event.group

    def handle(self, events: list[Ping], ctx: StageContext) -> list[ItemResult]:
        self.calls.append([e.id for e in events])
        results: list[ItemResult] = []
        with ctx.phase("toy.work"):
            for index, event in enumerate(events):
                attempt = self.attempts[event.id] = self.attempts.get(event.id, 0) + 1
                if event.block:
                    self.gates[event.block].wait(timeout=60)
                deadline = time.monotonic() + event.work_ms / 1000
                while time.monotonic() < deadline:
                    pass
                if fails(event.id, attempt, event.fail_p):
                    results.append(Flaky(f"attempt {attempt} of {event.id} failed"))
                    continue
                with ctx.phase("toy.item", item=index):
                    pong = Pong(id=event.id, worker=self.worker, attempt=attempt)
                results.append([Output(ctx.topics.images, pong)])
        return results


def main() -> None:
    logging.basicConfig(level=os.environ.get("TOY_LOG", "WARNING"))
    config = RuntimeConfig(
        max_batch=int(os.environ.get("TOY_MAX_BATCH", "4")),
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        commit_interval_ms=100,
        create_topics=False,
    )
    runtime = StageRuntime(ToyStage(os.environ.get("TOY_WORKER", "w")), Settings(), config)
    asyncio.run(runtime.serve())


if __name__ == "__main__":
    main()
