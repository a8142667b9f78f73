"""A consumer's fetch wait: short while records come, long once none has for a while.

A consumer with nothing to read sends one fetch per ``fetch_max_wait_ms`` and the
broker answers it empty when the wait runs out, so each idle consumer costs its own
process and the broker a wake per wait. A short wait is what keeps hops fast on tansu,
which answers a waiting fetch later the longer its wait (p50 about 5 ms at 25 ms, 6.5
at 50, 25 at 100: ``bench/idle_polling.py``); Apache Kafka answers as soon as a record
arrives, so there a long wait costs nothing. :class:`FetchWait` uses the short wait
(``KAFKA_FETCH_MAX_WAIT_MS``, 25 ms) while records come and the long one
(``KAFKA_FETCH_IDLE_WAIT_MS``, 50 ms) once none has come for
``KAFKA_FETCH_IDLE_AFTER_MS`` (100 ms): a worker or client waiting for work sends half
the empty fetches, and on tansu the first record after such a lull is read 1-3 ms
later.

aiokafka fixes the wait when the consumer is built, and has no public way to change it;
:class:`FetchWait` sets the attribute its fetcher reads when it builds each fetch
request (aiokafka 0.14's ``Fetcher._fetch_max_wait_ms``; tests/test_fetch_wait.py
checks the requests a consumer really sends, so an aiokafka that stops reading it
fails there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from plumbing.settings import Settings

log = logging.getLogger(__name__)

Batches = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]


class FetchWait:
    """``getmany`` for ``consumer`` that switches its fetch wait between ``busy_ms``
    (while records come) and ``idle_ms`` (once none came for ``idle_after_ms``).

    Build it after ``consumer.start()``. ``idle_ms <= busy_ms`` keeps ``busy_ms`` always.
    The switch to the short wait happens as the records are returned, before the
    consumer sends its next fetch; the fetch in flight keeps the wait it was sent with.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        busy_ms: int,
        idle_ms: int,
        idle_after_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.busy_ms = busy_ms
        self.idle_ms = max(idle_ms, busy_ms)
        self.idle_after_s = idle_after_ms / 1000
        self.clock = clock
        self._last_records = clock()
        self._fetcher = getattr(consumer, "_fetcher", None)
        if self._fetcher is None or not hasattr(self._fetcher, "_fetch_max_wait_ms"):
            # An aiokafka without the attribute, or a consumer not started: keep its wait.
            log.warning(
                "the consumer's fetch wait cannot be changed (not started, or an aiokafka "
                "without Fetcher._fetch_max_wait_ms): %d ms throughout",
                busy_ms,
            )
            self._fetcher = None
        self._set(busy_ms)

    @classmethod
    def from_settings(
        cls, consumer: AIOKafkaConsumer, settings: Settings, busy_ms: int | None = None
    ) -> FetchWait:
        """The waits of ``settings`` (``busy_ms``: another short wait, e.g. a runtime's)."""
        return cls(
            consumer,
            busy_ms=busy_ms or settings.kafka_fetch_max_wait_ms,
            idle_ms=settings.kafka_fetch_idle_wait_ms,
            idle_after_ms=settings.kafka_fetch_idle_after_ms,
        )

    @property
    def wait_ms(self) -> int:
        """The wait of the consumer's next fetch request."""
        return self._wait_ms

    @property
    def idle(self) -> bool:
        """Whether the next fetch waits the long wait (never when it is not longer)."""
        return self._wait_ms > self.busy_ms

    def _set(self, wait_ms: int) -> None:
        self._wait_ms = wait_ms
        if self._fetcher is not None:
            self._fetcher._fetch_max_wait_ms = wait_ms

    def observe(self, records: int) -> None:
        """Note what a ``getmany`` returned: ``records`` records (0: none)."""
        now = self.clock()
        if records:
            self._last_records = now
            if self._wait_ms != self.busy_ms:
                self._set(self.busy_ms)
        elif self._wait_ms < self.idle_ms and now - self._last_records >= self.idle_after_s:
            self._set(self.idle_ms)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int | None = None
    ) -> Batches:
        """``consumer.getmany``: records, or {} after ``timeout_ms``; the wait switches to
        the long one on time even when ``timeout_ms`` is longer than ``idle_after_ms``."""
        deadline = self.clock() + timeout_ms / 1000
        while True:
            left = deadline - self.clock()
            if self._wait_ms < self.idle_ms:  # still short, and a longer one exists
                left = min(left, self._last_records + self.idle_after_s - self.clock())
            batches = await self.consumer.getmany(
                *partitions, timeout_ms=max(0, round(left * 1000)), max_records=max_records
            )
            self.observe(sum(len(records) for records in batches.values()))
            if batches or self.clock() >= deadline:
                return batches


__all__ = ["FetchWait"]
