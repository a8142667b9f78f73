"""Records on their way through a stage (:class:`Job`), and micro-batching (:class:`ReadyQueue`).

Batching is pull-based: a free worker takes the oldest ready record and up to
``max_batch - 1`` compatible ones (equal, non-None ``Stage.batch_key``), waiting at
most ``max_wait_ms`` after the oldest arrived. Under load batches fill at once;
when idle, latency grows by at most ``max_wait_ms``. Retries run alone, so a poison
record cannot fail its batch mates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from opentelemetry.trace import Span

from consumers.offsets import PartitionState
from schemas import SourceInfo


@dataclass(eq=False, slots=True)
class Job:
    """One consumed record on its way through the stage."""

    record: ConsumerRecord[bytes, bytes]
    partition: PartitionState
    span: Span
    received_at: float
    event: Any = None
    attempts: int = 0
    alone: bool = False  # retries run alone, so a poison record cannot fail its batch mates
    handled: bool = False  # the handler returned for it (it waits for acks, or a retry)
    batch_key: Hashable | None = None
    headers: list[tuple[str, bytes]] | None = None  # trace headers of its outputs, once made
    w3c: bool = True  # the W3C propagator was in use when it was fetched (asked per fetch)

    @property
    def source(self) -> SourceInfo:
        r = self.record
        return SourceInfo(topic=r.topic, partition=r.partition, offset=r.offset)


class ReadyQueue:
    """Accepted records waiting for a worker, handed out as compatible batches."""

    def __init__(self, max_batch: int, max_wait_ms: int) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._jobs: list[Job] = []
        self._changed = asyncio.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def append(self, job: Job) -> None:
        """Add a fetched record; call :meth:`notify` once after a fetch's records."""
        self._jobs.append(job)

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def put_front(self, job: Job) -> None:
        """A record to retry: next in line, and alone."""
        job.alone = True
        async with self._changed:
            self._jobs.insert(0, job)
            self._changed.notify_all()

    async def take_partitions(self, revoked: set[TopicPartition]) -> list[Job]:
        """Remove and return the waiting records of ``revoked`` partitions."""
        async with self._changed:
            taken = [j for j in self._jobs if j.partition.tp in revoked]
            self._jobs = [j for j in self._jobs if j.partition.tp not in revoked]
            self._changed.notify_all()
        return taken

    async def close(self) -> list[Job]:
        """Stop handing out batches; return what was still waiting."""
        async with self._changed:
            self._closed = True
            taken, self._jobs = self._jobs, []
            self._changed.notify_all()
        return taken

    def _compatible(self, first: Job) -> list[Job]:
        """``first`` and the next ready records that may share its batch, in order."""
        limit = self.max_batch
        if first.alone or first.batch_key is None or limit == 1:
            return [first]
        key = first.batch_key
        batch = []
        for job in self._jobs:
            if not job.alone and job.batch_key == key:
                batch.append(job)
                if len(batch) == limit:
                    break
        return batch

    async def next_batch(self) -> list[Job] | None:
        """The next batch (see the module docstring); None once closed."""
        async with self._changed:
            while True:
                while not self._jobs:
                    if self._closed:
                        return None
                    await self._changed.wait()
                batch = await self._fill(self._jobs[0])
                if batch:
                    return batch

    def take_ready(self, batches: int) -> list[list[Job]]:
        """Up to ``batches`` more batches that need no wait: each full, or a record that
        runs alone, or past its ``max_wait_ms``; they leave the queue. Never waits."""
        taken: list[list[Job]] = []
        now = time.monotonic()
        while self._jobs and len(taken) < batches:
            first = self._jobs[0]
            batch = self._compatible(first)
            full = len(batch) == self.max_batch or first.alone or first.batch_key is None
            if not full and now < first.received_at + self.max_wait_s:
                break  # it may still fill: the next free worker waits for it
            self._remove(batch)
            taken.append(batch)
        return taken

    def _remove(self, batch: list[Job]) -> None:
        if self._jobs[len(batch) - 1] is batch[-1]:
            del self._jobs[: len(batch)]  # the usual case: the batch is the head
        else:
            taken = set(map(id, batch))
            self._jobs = [j for j in self._jobs if id(j) not in taken]

    async def _fill(self, first: Job) -> list[Job]:
        """Wait (bounded) for ``first``'s batch to fill and take it out of the queue;
        [] when the revoke path took ``first`` away meanwhile. Holds the condition."""
        deadline = first.received_at + self.max_wait_s
        batch = self._compatible(first)
        while 1 < self.max_batch and len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            if first.alone or first.batch_key is None or remaining <= 0 or self._closed:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
            if not self._jobs or self._jobs[0] is not first:
                return []
            batch = self._compatible(first)
        self._remove(batch)
        return batch
