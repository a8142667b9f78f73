"""Fetching with back-pressure: records from the broker into the ready queue.

Two bounds: at most ``max_in_flight`` records wait for the handler or are inside it
(the expensive part: model work), and at most ``max_unacked`` records whose handler
is done wait for the broker to acknowledge their outputs. At either bound the fetch
loop stops asking for records and waits until records move on, woken by the records
themselves rather than a timer. It goes on (with hysteresis: once
``min(max_batch, max_in_flight / 4)`` handler slots are free, and the acks are under
three quarters of their bound) where it left off.

The wait pauses the partitions, and the loop keeps polling while paused (waits
bounded by :data:`PAUSED_POLL_S`), so that the member stays alive past
``max_poll_interval_ms`` (model work can take minutes); partitions assigned meanwhile
start paused (:meth:`Fetcher.on_assigned`). But for a cheap handler
(:mod:`consumers.handoff`) it pauses them only after ``pause_after_ms``: aiokafka drops
a paused partition's prefetched records, so that a fast stage, full for a millisecond
at a time, waited for a fetch round trip after each pause (it drained a backlog 15 %
slower, docs/design-notes.md).

Nothing but records, or room for them, wakes the loop: idle, it waits up to
:data:`IDLE_POLL_MS` in ``getmany`` while aiokafka long-polls the broker, with the
long fetch wait once nothing has come for a while (:mod:`plumbing.fetch_wait`); once the
runtime stops, what a fetch still returns is not accepted, so no new work starts (the
partition's next owner fetches it again). Each wake of the event loop costs the
handler's thread a turn of the GIL; the 100 ms timers this replaced woke a waiting
runtime 10 times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from consumers.batching import Job, ReadyQueue
from consumers.metrics import StageMetrics
from consumers.offsets import Offsets, PartitionState
from consumers.stage import Stage
from consumers.tracing import RecordTracing
from plumbing.fetch_wait import FetchWait
from plumbing.telemetry import w3c_propagation

log = logging.getLogger(__name__)


#: The longest a paused fetch loop waits for room before it polls (for liveness only).
PAUSED_POLL_S = 1.0
#: The longest ``getmany`` waits for records before the loop goes round again.
IDLE_POLL_MS = 1000


class InFlight:
    """Records accepted and not yet settled: back-pressure for the fetcher, the drain
    for stop. ``count`` is every record held; ``handled`` those of them whose handler
    is done (they wait for acks, a dead letter or a retry); the rest, ``waiting``, wait
    for the handler or are inside it. ``room`` is set when fetching may resume, ``idle``
    when nothing is held."""

    def __init__(
        self, limit: int, max_batch: int, ack_limit: int = 1000, pause_after_s: float = 0.0
    ) -> None:
        self.max_batch = max_batch
        self.ack_limit = ack_limit
        # A paused fetch loop resumes once this few wait for acks (hysteresis).
        self.ack_resume_at = ack_limit - max(1, ack_limit // 4)
        # How long a full bound waits unpaused (0: it pauses at once); the runtime passes
        # RuntimeConfig.pause_after_ms, and the hand-off sets it to the handler's pace.
        self.pause_after_s = pause_after_s
        self.count = 0
        self.handled = 0
        self.room = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.set_limit(limit)

    def set_limit(self, limit: int) -> None:
        """Bound the records waiting for the handler or inside it to ``limit``."""
        self.limit = limit
        # A paused fetch loop resumes once this few records wait (hysteresis).
        self.resume_at = limit - max(1, min(self.max_batch, limit // 4))
        if self.resumable():
            self.room.set()

    @property
    def waiting(self) -> int:
        """Records waiting for the handler or inside it (counted against ``limit``)."""
        return self.count - self.handled

    def full(self) -> bool:
        return self.waiting >= self.limit or self.handled >= self.ack_limit

    def resumable(self) -> bool:
        return self.waiting <= self.resume_at and self.handled <= self.ack_resume_at

    async def wait_resumable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`resumable`; whether it is."""
        self.room.clear()
        if not self.resumable():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.room.wait(), timeout)
        return self.resumable()

    def add(self, count: int) -> None:
        self.count += count
        if count:
            self.idle.clear()

    def done_handling(self, jobs: list[Job]) -> None:
        """The handler returned for ``jobs``: they no longer count against ``limit``."""
        for job in jobs:
            if not job.handled:
                job.handled = True
                self.handled += 1
        if self.resumable():
            self.room.set()

    def requeue(self, job: Job) -> None:
        """``job`` goes back to the handler (a retry)."""
        if job.handled:
            job.handled = False
            self.handled -= 1

    def settle_done(self, jobs: list[Job]) -> None:
        """``settle(job, completed=True)`` for each of ``jobs``, checked for room once."""
        handled = 0
        for job in jobs:
            job.partition.done(job.record.offset)
            job.span.end()
            handled += job.handled
        self.count -= len(jobs)
        self.handled -= handled
        if self.resumable():
            self.room.set()
            if self.count == 0:
                self.idle.set()

    def settle(self, job: Job, *, completed: bool) -> None:
        """``job`` leaves the runtime; when ``completed`` its offset may be committed
        (otherwise it stays pending, and the partition's next owner redoes it)."""
        if completed:
            job.partition.done(job.record.offset)
        job.span.end()
        self.count -= 1
        if job.handled:
            self.handled -= 1
        if self.resumable():
            self.room.set()
            if self.count == 0:
                self.idle.set()


class Fetcher:
    """The fetch loop of one runtime (see the module docstring).

    Each fetched record is parsed at once: a valid one joins the ready queue, an
    invalid one goes to ``on_invalid`` (which dead-letters it).
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        fetch_wait: FetchWait,
        stage: Stage[object],
        offsets: Offsets,
        queue: ReadyQueue,
        in_flight: InFlight,
        tracing: RecordTracing,
        metrics: StageMetrics,
        on_invalid: Callable[[Job, Exception], None],
    ) -> None:
        self.consumer = consumer
        self.fetch_wait = fetch_wait
        self.stage = stage
        self.offsets = offsets
        self.queue = queue
        self.in_flight = in_flight
        self.tracing = tracing
        self.metrics = metrics
        self.on_invalid = on_invalid
        self.stopping = False
        #: Whether this loop has paused its partitions (at a bound).
        self.paused = False
        #: Records fetched once stopping began, not accepted (see :meth:`_accept_all`).
        self.left_unaccepted = 0

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions assigned while the loop is paused start paused: the loop may not
        look again for :data:`PAUSED_POLL_S`, and meanwhile they would be fetched."""
        if self.paused:
            self.consumer.pause(*assigned)

    async def run(self) -> None:
        consumer, in_flight = self.consumer, self.in_flight
        while not self.stopping:
            if not self.paused and in_flight.full():
                if await in_flight.wait_resumable(in_flight.pause_after_s):
                    continue  # unpaused: what the consumer prefetched meanwhile is kept
            room = in_flight.limit - in_flight.waiting
            timeout_ms = IDLE_POLL_MS
            if in_flight.full() or (self.paused and not in_flight.resumable()):
                consumer.pause(*consumer.assignment())
                self.paused = True
                # Wake up when records move on, not when a paused fetch times out; the
                # wait is bounded so that polling goes on (it keeps the member alive).
                if await in_flight.wait_resumable(PAUSED_POLL_S):
                    continue
                timeout_ms = 0
            elif self.paused:
                consumer.resume(*consumer.assignment())
                self.paused = False
            try:
                batches = await self.fetch_wait.getmany(
                    timeout_ms=timeout_ms, max_records=max(room, 1)
                )
            except KafkaError as exc:
                log.warning("fetch failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if batches:
                await self._accept_all(batches)

    async def _accept_all(self, batches: dict[object, list[ConsumerRecord[bytes, bytes]]]) -> None:
        if self.stopping:
            # Stopping starts no new work: a record accepted now would still be handed
            # out, and the drain would wait for its handler. Not accepted, it is not
            # committed either; the partition's next owner fetches it again.
            self.left_unaccepted += sum(len(records) for records in batches.values())
            return
        # Once per fetch, not per record: the clock, the tracing mode, the counters.
        now = time.monotonic()
        recording = self.tracing.recording()
        w3c = w3c_propagation()
        accepted = 0
        for tp, records in batches.items():
            part = self.offsets.get(tp)  # type: ignore[arg-type]
            if part is None or part.revoked:
                continue
            for record in records:
                self._accept(record, part, now, recording, w3c)
            accepted += len(records)
        if accepted:
            self.in_flight.add(accepted)
            self.metrics.received.inc(accepted)
            await self.queue.notify()  # one wake-up per fetch, not one task per record

    def _accept(
        self,
        record: ConsumerRecord[bytes, bytes],
        part: PartitionState,
        now: float,
        recording: bool,
        w3c: bool,
    ) -> None:
        part.accept(record.offset)
        span, headers = self.tracing.start(record, recording, w3c)
        job = Job(record, part, span, now, headers=headers, w3c=w3c)
        try:
            job.event = self.stage.parse(record.value or b"")
            job.batch_key = self.stage.batch_key(job.event)
        except Exception as exc:  # invalid input never crashes the stage
            self.on_invalid(job, exc)
            return
        self.queue.append(job)
