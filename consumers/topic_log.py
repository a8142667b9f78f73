"""The runtime's read access to topics for stages (:class:`consumers.stage.TopicLog`).

A stage that must know what it already published (the scene stage: was this scene's
event sent before a crash?) asks the runtime instead of opening a Kafka client.
Each call runs a short-lived consumer (no group, commits nothing) on a private
event loop in the calling thread, the handler's worker thread: never call it from
a running event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from plumbing.errors import TransientError
from plumbing.kafka import make_consumer
from plumbing.settings import Settings

T = TypeVar("T")


class KafkaTopicLog:
    """:class:`consumers.stage.TopicLog` over the settings' brokers."""

    def __init__(self, settings: Settings, *, timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self._run(self._end_offsets(topic))

    def find(self, topic: str, key: str, since: Mapping[int, int]) -> tuple[int, int] | None:
        return self._run(self._find(topic, key.encode("utf-8"), since))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run(asyncio.wait_for(coro, self.timeout_s))
        except (KafkaError, TimeoutError, OSError) as exc:
            raise TransientError(f"reading the topic log: {exc!r}") from exc

    async def _consumer(self, topic: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
        consumer = make_consumer(
            self.settings, enable_auto_commit=False, client_id="genseg-topic-log"
        )
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer.stop()
            raise TransientError(f"topic {topic} has no partitions (not created yet?)")
        return consumer, [TopicPartition(topic, p) for p in sorted(partitions)]

    async def _end_offsets(self, topic: str) -> dict[int, int]:
        consumer, tps = await self._consumer(topic)
        try:
            ends = await consumer.end_offsets(tps)
            return {tp.partition: int(offset) for tp, offset in ends.items()}
        finally:
            await consumer.stop()

    async def _find(
        self, topic: str, key: bytes, since: Mapping[int, int]
    ) -> tuple[int, int] | None:
        consumer, tps = await self._consumer(topic)
        try:
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            remaining = set()
            for tp in tps:
                start = since.get(tp.partition, 0)
                if start < ends[tp]:
                    consumer.seek(tp, start)
                    remaining.add(tp)
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, records in batches.items():
                    for record in records:
                        if record.key == key and record.offset < ends[tp]:
                            return tp.partition, record.offset
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return None
        finally:
            await consumer.stop()
