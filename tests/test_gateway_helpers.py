"""Helpers shared by the gateway and gallery tests (no tests here).

Everything is real: the session's tansu broker, the gateway's uvicorn server on
127.0.0.1, httpx over TCP, and for the flows the generator and segmenter runtimes
with the tiny models in this process (as ``genseg demo`` runs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from aiokafka import TopicPartition

from genseg.demo import QUICK_JOIN
from genseg.gateway import Gateway, GatewayConfig
from genseg.workers import build_runtimes, running
from plumbing.kafka import ensure_topics, make_admin, make_consumer
from plumbing.settings import Settings

#: Generous: two cores, shared by the broker, both workers, the gateway and the test.
OUTCOME_S = 120.0


def fresh_settings(bootstrap: str, blob_dir: Path, **overrides: Any) -> Settings:
    """Settings on the session broker with a topic prefix of their own."""
    prefix = f"gw{os.getpid()}-{secrets.token_hex(3)}"
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap, "topic_prefix": prefix,
        "blob_url": str(blob_dir), "models": "tiny", **overrides,
    }  # fmt: skip
    return Settings(**values)


def tiny_body(**overrides: Any) -> dict[str, Any]:
    """A request the tiny models finish in about a second: 64x64, few steps, every mask
    kept (random SAM weights never reach the contract's 0.8)."""
    body: dict[str, Any] = {
        "prompt": "a red circle next to a blue square",
        "targets": ["circle"],
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 7,
        "segmentation": {"min_confidence": 0.0},
    }
    body.update(overrides)
    return body


@contextlib.asynccontextmanager
async def pipeline(settings: Settings) -> AsyncIterator[None]:
    """The generator and segmenter runtimes (tiny models) in this process."""
    await ensure_topics(settings, partitions=1)
    runtimes = [
        *build_runtimes("gen", settings, **QUICK_JOIN),
        *build_runtimes("seg", settings, scenes=False, **QUICK_JOIN),
    ]
    async with running(runtimes):
        yield


@contextlib.asynccontextmanager
async def gateway(
    settings: Settings, db_path: Path, **config: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A gateway on a free loopback port and an HTTP client for it."""
    async with Gateway(settings, port=0, config=GatewayConfig(db_path=db_path, **config)) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=OUTCOME_S) as client:
            yield gw, client


async def topic_size(settings: Settings, short: str) -> int:
    """Records on a topic so far (all partitions): to check that nothing was published."""
    topic = settings.topics.name(short)
    admin = make_admin(settings)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in meta["partitions"]]
    assert partitions, f"no topic {topic}"
    consumer = make_consumer(settings, enable_auto_commit=False)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def read_sse(
    client: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None
) -> list[SseEvent]:
    """Every event of a stream until the server closes it (after ``end``)."""
    events: list[SseEvent] = []
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, list[str]] = {}
        async for line in response.aiter_lines():
            if line == "":
                if "data" in fields:
                    events.append(
                        SseEvent(
                            (fields.get("id") or [None])[0],
                            (fields.get("event") or ["message"])[0],
                            "\n".join(fields["data"]),
                        )
                    )
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields.setdefault(name, []).append(value)
    return events
