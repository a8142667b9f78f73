"""The stage runtime: runs one :class:`~consumers.stage.Stage` as a Kafka consumer-group member.

It owns every Kafka concern so that a stage is only a handler. This module is the
coordinator: lifecycle (start, stop, SIGTERM), the worker loops that hand batches to
a thread pool, and rebalances. Each other concern has a module of its own:

- :mod:`consumers.fetcher`: fetching and back-pressure (at most ``max_in_flight``
  records held; then the partitions pause);
- :mod:`consumers.batching`: the ready queue and micro-batching (``max_batch``,
  ``max_wait_ms``);
- :mod:`consumers.handoff`: handler calls in the thread pool, several batches a trip
  for a handler whose calls take microseconds;
- :mod:`consumers.outputs`: publishing outputs in order, the terminal one last;
- :mod:`consumers.failures`: retries with backoff, dead letters;
- :mod:`consumers.offsets`: contiguous-prefix commits (at-least-once), lag;
- :mod:`consumers.tracing`: a ``process`` span per record, batch and phase spans;
- :mod:`consumers.metrics`: Prometheus metrics;
- :mod:`consumers.topic_log`: read access to topics for stages that need it.

Rebalance: revoked partitions stop taking work, running batches get
``rebalance_drain_s`` to finish, finished offsets are committed, the rest is left
to the next owner. Stop: fetching stops, records not started are left uncommitted,
running batches drain (``drain_timeout_s``), offsets are committed, the member
leaves the group.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from opentelemetry import trace

from consumers.batching import Job, ReadyQueue
from consumers.config import RuntimeConfig
from consumers.failures import Failures, tenant_of
from consumers.fetcher import Fetcher, InFlight
from consumers.handoff import Handoff
from consumers.metrics import StageMetrics, observe_many
from consumers.offsets import Offsets
from consumers.outputs import OutputSender
from consumers.stage import ItemResult, Output, Stage, StageContext
from consumers.topic_log import KafkaTopicLog
from consumers.tracing import RecordTracing
from plumbing.blobstore import BlobStore
from plumbing.fetch_wait import FetchWait
from plumbing.kafka import ensure_topics, make_consumer
from plumbing.lifecycle import AsyncService
from plumbing.settings import Settings
from producers.publisher import Publisher

log = logging.getLogger(__name__)

__all__ = ["RuntimeConfig", "StageRuntime", "until_signalled"]


async def until_signalled() -> None:
    """Wait for SIGTERM or SIGINT: the process's graceful stop.

    The handlers stay installed until the event loop closes: a second Ctrl-C while the
    caller drains and stops must not raise KeyboardInterrupt in the middle of it.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runtime: StageRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.runtime._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.runtime._on_assigned(set(assigned))


class StageRuntime(AsyncService):
    """Runs ``stage`` as a member of its consumer group until stopped.

    Usage::

        async with StageRuntime(stage, settings, RuntimeConfig(max_batch=4)) as rt:
            await rt.wait_stopped()  # or do other work while it consumes

    ``serve()`` runs until SIGTERM or SIGINT.
    """

    def __init__(
        self,
        stage: Stage[Any],
        settings: Settings,
        config: RuntimeConfig | None = None,
        *,
        blob: BlobStore | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: StageMetrics | None = None,
    ) -> None:
        self.stage = stage
        self.settings = settings
        self.config = config or RuntimeConfig(**stage.runtime_defaults)
        if stage.sequential and (self.config.max_batch > 1 or self.config.concurrency > 1):
            raise ValueError(
                f"stage {stage.name} handles one record at a time: "
                "max_batch and concurrency must be 1"
            )
        self.topics = settings.topics
        self.input_topic = self.topics.name(stage.input_topic)
        self.group_id = self.config.group_id or f"{settings.topic_prefix}.{stage.name}"
        self.blob = blob or BlobStore.from_settings(settings)
        self.metrics = metrics or StageMetrics(stage.name)
        self.offsets = Offsets(self.metrics)
        self.queue = ReadyQueue(self.config.max_batch, self.config.max_wait_ms)
        self.in_flight_records = InFlight(
            self.config.in_flight_limit,
            self.config.max_batch,
            self.config.max_unacked,
            pause_after_s=self.config.pause_after_ms / 1000,
        )
        # Read when scraped: nothing to update per record.
        self.metrics.in_flight.set_function(lambda: self.in_flight_records.count)
        self.tracing = RecordTracing(stage.name, self.group_id, tracer_provider)
        self._publisher = Publisher(
            settings,
            tracer_provider=tracer_provider,
            max_batch_size=self.config.producer_batch_bytes,
        )
        self.sender = OutputSender(self._publisher)
        self.failures = Failures(
            stage,
            self.config,
            self.topics,
            self.metrics,
            self.queue,
            self.in_flight_records,
            self.sender,
        )
        self.topic_log = KafkaTopicLog(settings)
        self._consumer: AIOKafkaConsumer | None = None
        self._fetcher: Fetcher | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.concurrency, thread_name_prefix=f"genseg-{stage.name}"
        )
        self._batch_finished = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Rounds of the periodic commit loop so far (whether or not they had news).
        self.commit_rounds = 0
        self.handoff = Handoff(
            stage,
            self.config,
            self._executor,
            self.tracing,
            self.metrics,
            self.in_flight_records,
            self._context,
        )

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stage's models, create topics, join the group, start consuming."""
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, self.stage.setup)
        if self.config.create_topics:
            await ensure_topics(self.settings, partitions=self.config.partitions)
        await self._publisher.start()
        fetch_wait = self.config.fetch_max_wait_ms or self.settings.kafka_fetch_max_wait_ms
        self._consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            group_instance_id=self.config.instance_id,
            enable_auto_commit=False,
            auto_offset_reset=self.config.auto_offset_reset,
            session_timeout_ms=self.config.session_timeout_ms
            or self.settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            max_poll_interval_ms=self.config.max_poll_interval_ms,
            fetch_max_wait_ms=fetch_wait,
            client_id=f"genseg-{self.stage.name}",
        )
        await self._consumer.start()
        self._consumer.subscribe([self.input_topic], listener=_Rebalance(self))
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port)
        self._fetcher = Fetcher(
            self._consumer,
            FetchWait.from_settings(self._consumer, self.settings, busy_ms=fetch_wait),
            self.stage,
            self.offsets,
            self.queue,
            self.in_flight_records,
            self.tracing,
            self.metrics,
            on_invalid=lambda job, exc: self._spawn(self.failures.dead_letter(job, exc)),
        )
        self._tasks = [
            asyncio.create_task(self._fetcher.run(), name="genseg-fetch"),
            asyncio.create_task(self._commit_loop(), name="genseg-commit"),
            asyncio.create_task(self._lag_loop(), name="genseg-lag"),
        ]
        self._tasks += [
            asyncio.create_task(self._worker_loop(), name=f"genseg-worker-{i}")
            for i in range(self.config.concurrency)
        ]
        log.info(
            "stage %s consuming %s as group %s", self.stage.name, self.input_topic, self.group_id
        )

    async def stop(self) -> None:
        """Stop fetching, drain in-flight work (bounded), commit, leave the group."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = self.failures.stopping = True
        if self._fetcher is not None:
            self._fetcher.stopping = True
        log.info(
            "stage %s stopping: draining %d in flight",
            self.stage.name,
            self.in_flight_records.count,
        )
        # Work not started yet is left uncommitted: the partition's next owner redoes it.
        retries = self.failures.cancel_retries()
        for job in await self.queue.close():
            self.in_flight_records.settle(job, completed=False)
        try:
            await asyncio.wait_for(self.in_flight_records.idle.wait(), self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timed out with %d records in flight", self.in_flight_records.count)
        # After the drain only side work is left (progress sends, a timed-out batch's).
        leftovers = [*self._tasks, *retries, *self._side_tasks]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        if self._consumer is not None:
            await self.offsets.commit(self._consumer)
            await self._consumer.stop()  # sends LeaveGroup
        await self._publisher.stop()
        self.metrics.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stage %s stopped", self.stage.name)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        await self.start()
        try:
            await until_signalled()
        finally:
            await self.stop()

    @property
    def in_flight(self) -> int:
        return self.in_flight_records.count

    def committed_offsets(self) -> dict[TopicPartition, int | None]:
        """What this runtime last committed per assigned partition (for tests and ops)."""
        return self.offsets.committed()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- work ------------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        while True:
            batch = await self.queue.next_batch()
            if batch is None:
                return
            live = [batch]
            if more := self.handoff.room():
                live += self.queue.take_ready(more)
            jobs = [job for taken in live for job in taken]
            if any(job.partition.revoked for job in jobs):  # rare: revoked while queued
                live, jobs = self._drop_revoked(live)
                if not live:
                    continue
            for job in jobs:
                job.partition.running += 1
            try:
                results = await self.handoff.run(live)
            except BaseException:
                self._end_running(jobs)
                raise
            self.in_flight_records.done_handling(jobs)
            if self.stage.sequential:  # the next record must see these outputs on the topic
                await self._complete(jobs, results)
            else:
                # Publishing and waiting for the broker's acks go on in a tracked task while
                # this worker takes its next batch; the records stay in flight until acked.
                self._spawn(self._complete(jobs, results))

    def _drop_revoked(self, batches: list[list[Job]]) -> tuple[list[list[Job]], list[Job]]:
        """``batches`` without the records of revoked partitions (left uncommitted, for
        the partition's next owner), and their records."""
        live: list[list[Job]] = []
        for candidate in batches:
            kept = [j for j in candidate if not j.partition.revoked]
            for job in candidate:
                if job.partition.revoked:
                    self.in_flight_records.settle(job, completed=False)
            if kept:
                live.append(kept)
        return live, [job for kept in live for job in kept]

    def _end_running(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.partition.running -= 1
        self._batch_finished.set()

    def _context(self, jobs: list[Job]) -> StageContext:
        return StageContext(
            blob=self.blob,
            topics=self.topics,
            settings=self.settings,
            emit=lambda output, item: self._emit_threadsafe(output, jobs, item),
            attempt=jobs[0].attempts if len(jobs) == 1 else max(j.attempts for j in jobs),
            topic_log=self.topic_log,
        )

    def _emit_threadsafe(self, output: Output, jobs: list[Job], item: int | None) -> None:
        """Called from the handler thread: publish a side record, fire-and-forget."""
        assert self._loop is not None
        job = jobs[item] if item is not None and 0 <= item < len(jobs) else jobs[0]
        self._loop.call_soon_threadsafe(self._spawn, self.sender.side_record(job, output))

    async def _complete(self, jobs: list[Job], results: list[ItemResult]) -> None:
        """Publish a finished batch's outputs, then settle each record on its acks."""
        try:
            done = await self.sender.settle(jobs, results, self.failures.failed)
            if done:
                self._processed(done)
        finally:
            self._end_running(jobs)

    def _processed(self, jobs: list[Job]) -> None:
        """Count and settle records whose outputs the broker acknowledged (per batch)."""
        now = time.monotonic()
        tenants: dict[str | None, int] = {}
        observe_many(self.metrics.latency, [now - job.received_at for job in jobs])
        for job in jobs:
            tenant = tenant_of(job.event, job.record.value)
            tenants[tenant] = tenants.get(tenant, 0) + 1
        self.in_flight_records.settle_done(jobs)
        self.metrics.processed.inc(len(jobs))
        for tenant, count in tenants.items():
            self.metrics.tenant_outcome(tenant, "processed", count)

    # --- commits and rebalance ---------------------------------------------------------

    async def _commit_loop(self) -> None:
        assert self._consumer is not None
        while True:
            await asyncio.sleep(self.config.commit_interval_ms / 1000)
            await self.offsets.commit(self._consumer)
            self.commit_rounds += 1

    async def _lag_loop(self) -> None:
        assert self._consumer is not None
        while True:
            await asyncio.sleep(self.config.lag_interval_s)
            await self.offsets.report_lag(self._consumer)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.offsets.assign(assigned)
        if self._fetcher is not None:
            self._fetcher.on_assigned(assigned)
        log.info("stage %s assigned %s", self.stage.name, sorted(p.partition for p in assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop taking work from ``revoked``, let in-flight finish (bounded), commit, forget."""
        if not revoked:
            return
        parts = self.offsets.owned(revoked)
        dropped = await self.queue.take_partitions(revoked)
        # Running batches get a bounded time to finish so their offsets can be committed.
        deadline = time.monotonic() + self.config.rebalance_drain_s
        while any(p.running for p in parts) and (remaining := deadline - time.monotonic()) > 0:
            self._batch_finished.clear()
            try:
                await asyncio.wait_for(self._batch_finished.wait(), remaining)
            except TimeoutError:
                break
        if self._consumer is not None:
            await self.offsets.commit(self._consumer, only=revoked)
        self.offsets.forget(parts)
        for job in dropped:
            self.in_flight_records.settle(job, completed=False)
        log.info("stage %s revoked %s", self.stage.name, sorted(p.partition for p in revoked))
