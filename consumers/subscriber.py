"""The downstream API: iterate over contract events, or wait for one request's outcome.

``Subscriber`` reads without a consumer group (it commits nothing and never
steals partitions from workers). Its start position is pinned when it starts:
``"latest"`` sees every record produced after :meth:`Subscriber.start` returned,
so start it before submitting and nothing is missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from plumbing.fetch_wait import FetchWait
from plumbing.kafka import make_consumer
from plumbing.lifecycle import AsyncService
from plumbing.settings import Settings
from schemas import (
    AssetReadyEvent,
    DeadLetterEvent,
    Event,
    InvalidEvent,
    decode_record,
)

log = logging.getLogger(__name__)

Terminal = AssetReadyEvent | DeadLetterEvent


def partition_for_key(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) picks for ``key``."""
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions


class Subscriber(AsyncService):
    """Async iterator over events of the given short topic names.

    Usage::

        async with Subscriber(settings, ["assets", "dlq"]) as sub:
            request_id = await client.submit("a cup", targets=["cup"])
            outcome = await sub.wait_for(request_id, timeout=60)
    """

    def __init__(
        self,
        settings: Settings,
        topics: Iterable[str] = ("assets", "dlq"),
        *,
        start: Literal["latest", "earliest"] = "latest",
        only_key: str | None = None,
    ) -> None:
        self.settings = settings
        #: full topic name -> short name: each record is decoded as an event of its topic.
        self._short_names = {settings.topics.name(t): t for t in topics}
        self.topic_names = list(self._short_names)
        self.start_at = start
        self.only_key = only_key
        self._consumer: AIOKafkaConsumer = None  # type: ignore[assignment]  # made in start()
        self._fetch_wait: FetchWait = None  # type: ignore[assignment]  # made in start()

    async def start(self) -> None:
        self._consumer = make_consumer(
            self.settings, enable_auto_commit=False, client_id="genseg-subscriber"
        )
        await self._consumer.start()
        self._fetch_wait = FetchWait.from_settings(self._consumer, self.settings)
        try:
            await self._assign()
        except BaseException:
            # ``async with`` does not call stop() when start() fails: close the consumer here.
            await self._consumer.stop()
            raise

    async def _assign(self) -> None:
        partitions: list[TopicPartition] = []
        for topic in self.topic_names:
            numbers = await self._partitions_of(topic)
            if self.only_key is not None:
                # Every stage keys its output by the request id: one partition holds it all.
                numbers = {partition_for_key(self.only_key, len(numbers))}
            partitions += [TopicPartition(topic, p) for p in sorted(numbers)]
        self._consumer.assign(partitions)
        if self.start_at == "latest":
            await self._consumer.seek_to_end(*partitions)
        else:
            await self._consumer.seek_to_beginning(*partitions)
        for tp in partitions:  # resolve the lazy seek now, so the position is pinned
            await self._consumer.position(tp)

    async def _partitions_of(self, topic: str) -> set[int]:
        deadline = time.monotonic() + 10
        while True:
            numbers = self._consumer.partitions_for_topic(topic)
            if numbers:
                return set(numbers)
            if time.monotonic() > deadline:
                raise LookupError(f"topic {topic} does not exist (run `genseg topics create`)")
            # No public call refreshes the consumer's own metadata (``topics()`` returns a
            # copy), and a topic created a moment ago is not in it yet.
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def next_events(self, timeout_s: float = 1.0) -> list[tuple[str, Event]]:
        """The (topic, event) pairs that arrived within ``timeout_s`` (possibly none)."""
        batches = await self._fetch_wait.getmany(timeout_ms=int(timeout_s * 1000))
        out: list[tuple[str, Event]] = []
        for tp, records in batches.items():
            for record in records:
                if self.only_key is not None and record.key != self.only_key.encode():
                    continue
                try:
                    event = decode_record(self._short_names[tp.topic], record.value or b"")
                    out.append((tp.topic, event))
                except InvalidEvent as exc:
                    log.warning("skipping undecodable record %s@%d: %s", tp, record.offset, exc)
        return out

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            for _topic, event in await self.next_events():
                yield event

    async def wait_for(
        self, request_id: str, *, num_images: int = 1, timeout: float = 300.0
    ) -> list[Terminal]:
        """The terminal events (asset-ready or dead-letter) of every image of ``request_id``.

        Redelivered duplicates are dropped (first one per image wins). A dead-letter
        event without ``image_index`` ends every image of the request. Raises
        :class:`TimeoutError` when the outcome is not complete within ``timeout``.
        """
        outcomes: dict[int, Terminal] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < num_images:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"request {request_id}: {len(outcomes)} of {num_images} outcomes "
                    f"after {timeout:.0f}s"
                )
            for _topic, event in await self.next_events(min(remaining, 1.0)):
                if not isinstance(event, Terminal) or event.id != request_id:
                    continue
                if isinstance(event, DeadLetterEvent) and event.image_index is None:
                    for index in range(num_images):
                        outcomes.setdefault(index, event)
                else:
                    outcomes.setdefault(event.image_index or 0, event)
        return [outcomes[i] for i in sorted(outcomes)]


async def subscribe(
    settings: Settings,
    topics: Iterable[str] = ("assets",),
    *,
    start: Literal["latest", "earliest"] = "latest",
) -> AsyncIterator[Event]:
    """``async for event in subscribe(settings, ["assets"])``: events as they arrive."""
    async with Subscriber(settings, topics, start=start) as sub:
        async for event in sub:
            yield event


async def wait_for(
    settings: Settings, request_id: str, *, num_images: int = 1, timeout: float = 300.0
) -> list[Terminal]:
    """Wait for the outcome of ``request_id``, reading its partition from the beginning."""
    async with Subscriber(
        settings, ("assets", "dlq"), start="earliest", only_key=request_id
    ) as sub:
        return await sub.wait_for(request_id, num_images=num_images, timeout=timeout)


__all__ = ["Subscriber", "partition_for_key", "subscribe", "wait_for"]
