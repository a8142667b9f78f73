"""Reading topics and group offsets in tests, waiting on conditions (never on sleeps)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from plumbing.settings import Settings
from schemas import InvalidEvent, decode_record


class TopicReader:
    """Reads whole topics from the beginning, accumulating records until a condition holds.

    Every record read must be a valid event of its topic (``schemas.decode_record``), else
    the read fails the test: whatever a stage writes is checked against the registry.
    ``unchecked`` names the topics (short names) deliberately carrying other records, such
    as the toy stage's ``Pong`` on the images topic; only those are not checked.
    """

    def __init__(
        self, settings: Settings, *short_names: str, unchecked: Iterable[str] = ()
    ) -> None:
        self.settings = settings
        self.unchecked = frozenset(unchecked)
        if not self.unchecked <= set(short_names):
            raise ValueError(f"unchecked {sorted(self.unchecked)} not among {short_names}")
        #: full topic name -> short name, the registry's key.
        self._short_names = {settings.topics.name(n): n for n in short_names}
        self.topics = list(self._short_names)
        self.records: dict[str, list[ConsumerRecord[bytes, bytes]]] = {t: [] for t in self.topics}
        self._consumer = AIOKafkaConsumer(
            *self.topics, auto_offset_reset="earliest", **settings.kafka_kwargs()
        )

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    def values(self, short_name: str) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.records[self.settings.topics.name(short_name)]]

    def keys(self, short_name: str) -> list[str]:
        return [r.key.decode() for r in self.records[self.settings.topics.name(short_name)]]

    async def poll(self, timeout_ms: int = 200) -> None:
        for tp, batch in (await self._consumer.getmany(timeout_ms=timeout_ms)).items():
            if self._short_names[tp.topic] not in self.unchecked:
                for record in batch:
                    self._check(record)
            self.records[tp.topic].extend(batch)

    def _check(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Fail the test when ``record`` is not a valid event of its topic."""
        short = self._short_names[record.topic]
        try:
            decode_record(short, record.value or b"")
        except InvalidEvent as exc:
            raise AssertionError(
                f"{record.topic} partition {record.partition} offset {record.offset}: "
                f"not a valid event of topic {short!r}: {exc}"
            ) from None

    async def until(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll until ``condition()`` is true; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                counts = {t: len(r) for t, r in self.records.items()}
                raise AssertionError(f"condition not met within {timeout}s; records: {counts}")
            await self.poll()


async def committed_offsets(
    settings: Settings, group_id: str, topic: str, partitions: int
) -> dict[int, int | None]:
    """The consumer group's committed offsets, read from the broker."""
    consumer = AIOKafkaConsumer(group_id=group_id, **settings.kafka_kwargs())
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def eventually(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Wait until ``condition()`` holds, checking every 20 ms; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or condition}")
        await asyncio.sleep(0.02)
