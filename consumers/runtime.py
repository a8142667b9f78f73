"""The stage runtime: runs one :class:`~consumers.stage.Stage` as a Kafka consumer-group member.

It owns every Kafka concern so a stage is only a handler:

- at-least-once: auto-commit off; a partition's offset is committed only past
  records whose outputs the broker acknowledged, and only as a contiguous
  prefix (a slow record at offset k holds the commit at k);
- handler work runs in a thread pool, off the event loop, so heartbeats go on;
  at most ``max_in_flight`` records are accepted, then the partitions pause;
- micro-batching: a free worker takes up to ``max_batch`` compatible records,
  waiting at most ``max_wait_ms`` after the oldest one arrived;
- errors: invalid records are dead-lettered at once, transient failures are
  retried with exponential backoff and then dead-lettered; a poison record is
  retried alone so it never fails its batch mates or blocks its partition;
- rebalance: revoked partitions stop taking work, in-flight records get a
  bounded time to finish, finished offsets are committed, the rest is left to
  the next owner; optional static membership (``instance_id``);
- shutdown (SIGTERM): stop fetching, drain, commit, leave the group;
- tracing: a ``process {topic}`` CONSUMER span per record, child of the
  upstream context; handler phases become child spans of every record they
  served; a ``batch {stage}`` span links the records of a batch; outputs carry
  the record's context on. When no span processor would see a span
  (:func:`plumbing.telemetry.spans_recorded`), the ``process`` span is only a new span
  id in the upstream trace, and batch and phase spans are skipped;
- metrics: see :class:`consumers.metrics.StageMetrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from pydantic import BaseModel, TypeAdapter, ValidationError

from consumers.metrics import StageMetrics
from consumers.stage import ItemResult, Output, Stage, StageContext
from plumbing.blobstore import BlobStore
from plumbing.errors import error_type_of, is_permanent
from plumbing.kafka import ensure_topics
from plumbing.lifecycle import AsyncService
from plumbing.settings import Settings
from plumbing.telemetry import (
    TRACER_NAME,
    child_span_context,
    child_trace_headers,
    context_from_headers,
    headers_from_context,
    span_context_from_headers,
    spans_recorded,
    traceparent_headers,
    w3c_propagation,
)
from producers.publisher import Publisher
from schemas import DeadLetterEvent, SourceInfo
from schemas.events import TenantId

log = logging.getLogger(__name__)


class JobTimeout(Exception):
    """A handler call ran past ``job_timeout_s``."""

    error_type = "timeout"


@dataclass
class RuntimeConfig:
    """Tuning of one stage runtime. Times in milliseconds unless the name says seconds."""

    max_batch: int = 1
    max_wait_ms: int = 20
    concurrency: int = 1
    #: Records held at once (running, ready, being acked); then fetching pauses. None:
    #: two batches a slot (``2 * max_batch * concurrency``), at least 8. Model work takes
    #: seconds a batch, so more only wait in this process: unseen by a member that joins
    #: after a rebalance, and polled for at the broker while this one has plenty.
    max_in_flight: int | None = None
    max_attempts: int = 3
    backoff_initial_ms: int = 200
    backoff_max_ms: int = 10_000
    job_timeout_s: float | None = 900.0
    commit_interval_ms: int = 200
    drain_timeout_s: float = 30.0
    rebalance_drain_s: float = 10.0
    group_id: str | None = None  # default: "{prefix}.{stage.name}"
    instance_id: str | None = None  # static membership (group.instance.id)
    # Kafka notices a dead member after the session timeout; tansu also completes a
    # group join only after half of it, so it stays short (aiokafka's default).
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_interval_ms: int = 300_000
    fetch_max_wait_ms: int | None = None  # None: Settings.kafka_fetch_max_wait_ms
    # The output producer's batch size per partition. aiokafka sends one batch per
    # partition per request and one request per broker at a time, so under load this
    # bounds what a round trip carries (its 16 KiB default: ~50 small records).
    producer_batch_bytes: int = 128 * 1024
    create_topics: bool = True
    partitions: int = 4
    metrics_port: int | None = None
    lag_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("max_batch, concurrency and max_attempts must be >= 1")
        if self.max_in_flight is None:
            self.max_in_flight = max(2 * self.max_batch * self.concurrency, 8)
        if self.max_in_flight < self.max_batch:
            raise ValueError("max_in_flight must be at least max_batch")


@dataclass
class _Partition:
    """Offset bookkeeping of one assigned partition (contiguous-prefix commits)."""

    tp: TopicPartition
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset fetched
    committed: int | None = None
    running: int = 0  # records inside a handler call or publishing their outputs
    revoked: bool = False

    def committable(self) -> int | None:
        return min(self.pending) if self.pending else self.next_offset


@dataclass(eq=False, slots=True)
class _Job:
    """One consumed record on its way through the stage."""

    record: ConsumerRecord[bytes, bytes]
    partition: _Partition
    span: Span
    received_at: float
    event: Any = None
    attempts: int = 0
    alone: bool = False  # retries run alone, so a poison record cannot fail its batch mates
    batch_key: Hashable | None = None
    headers: list[tuple[str, bytes]] | None = None  # trace headers of its outputs, once made

    @property
    def source(self) -> SourceInfo:
        r = self.record
        return SourceInfo(topic=r.topic, partition=r.partition, offset=r.offset)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (its record already failed on an earlier one)."""
    if not future.cancelled():
        future.exception()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, runtime: StageRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.runtime._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.runtime._on_assigned(set(assigned))


_TENANT_ID: TypeAdapter[str] = TypeAdapter(TenantId)


def tenant_of(event: Any, raw: bytes | None) -> str | None:
    """The tenant a record names: its event's ``tenant``, or for a record that could not
    be parsed, a well-formed ``tenant`` string of its JSON (so its dead letter and the
    per-tenant metrics still name it)."""
    if event is not None:
        # A model's fields are in its __dict__; getattr of a field it lacks raises inside
        # pydantic, which costs more than all the rest of this per record.
        tenant = (
            event.__dict__.get("tenant")
            if isinstance(event, BaseModel)
            else getattr(event, "tenant", None)
        )
        return tenant if isinstance(tenant, str) else None
    try:
        data = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return None
    tenant = data.get("tenant") if isinstance(data, dict) else None
    try:
        return _TENANT_ID.validate_python(tenant) if isinstance(tenant, str) else None
    except ValidationError:
        return None


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
        self.config = config or RuntimeConfig()
        self.topics = settings.topics
        self.input_topic = self.topics.name(stage.input_topic)
        self.group_id = self.config.group_id or f"{settings.topic_prefix}.{stage.name}"
        self.blob = blob or BlobStore.from_url(settings.blob_url)
        self.metrics = metrics or StageMetrics(stage.name)
        self._tracer_provider = tracer_provider
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._publisher = Publisher(
            settings,
            tracer_provider=tracer_provider,
            max_batch_size=self.config.producer_batch_bytes,
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=self.config.concurrency, thread_name_prefix=f"genseg-{stage.name}"
        )
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._ready: list[_Job] = []  # accepted, waiting for a worker
        self._ready_changed = asyncio.Condition()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # A paused fetch loop resumes once this few records are in flight (hysteresis).
        self._resume_at = self.config.max_in_flight - max(
            1, min(self.config.max_batch, self.config.max_in_flight // 4)
        )
        self._room = asyncio.Event()
        # Read when scraped: nothing to update per record.
        self.metrics.in_flight.set_function(lambda: self._in_flight)
        self._batch_finished = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Rounds of the periodic commit loop so far (whether or not they had news).
        self.commit_rounds = 0

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stage's models, create topics, join the group, start consuming."""
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, self.stage.setup)
        if self.config.create_topics:
            await ensure_topics(self.settings, partitions=self.config.partitions)
        await self._publisher.start()
        self._consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            group_instance_id=self.config.instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            max_poll_interval_ms=self.config.max_poll_interval_ms,
            fetch_max_wait_ms=self.config.fetch_max_wait_ms
            or self.settings.kafka_fetch_max_wait_ms,
            client_id=f"genseg-{self.stage.name}",
            **self.settings.kafka_kwargs(),
        )
        await self._consumer.start()
        self._consumer.subscribe([self.input_topic], listener=_Listener(self))
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port)
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name="genseg-fetch"),
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
        self._stopping = True
        log.info("stage %s stopping: draining %d in flight", self.stage.name, self._in_flight)
        # Work not started yet is left uncommitted: the partition's next owner redoes it.
        for task in list(self._retry_tasks):
            task.cancel()
        async with self._ready_changed:
            waiting, self._ready = self._ready, []
            self._ready_changed.notify_all()
        for job in waiting:
            self._release(job, completed=False)
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timed out with %d records in flight", self._in_flight)
        # After the drain only side work is left (progress sends, a timed-out batch's).
        leftovers = [*self._tasks, *self._retry_tasks, *self._side_tasks]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await self._commit()
        if self._consumer is not None:
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
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def committed_offsets(self) -> dict[TopicPartition, int | None]:
        """What this runtime last committed per assigned partition (for tests and ops)."""
        return {tp: p.committed for tp, p in self._partitions.items()}

    # --- fetching ----------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        paused = False
        while not self._stopping:
            room = self.config.max_in_flight - self._in_flight
            timeout_ms = 100
            if room <= 0 or (paused and self._in_flight > self._resume_at):
                # Also pauses partitions assigned since the last round.
                consumer.pause(*consumer.assignment())
                paused = True
                # Wake up when records finish, not when a paused fetch times out; the
                # wait is bounded so that polling goes on (it keeps the member alive).
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.1)
                if self._in_flight <= self._resume_at:
                    continue
                timeout_ms = 0
            elif paused:
                consumer.resume(*consumer.assignment())
                paused = False
            try:
                batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max(room, 1))
            except KafkaError as exc:
                log.warning("fetch failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if not batches:
                continue
            # Once per fetch, not per record: the clock, the tracing mode, the counters.
            now = time.monotonic()
            recording = spans_recorded(self._tracer_provider)
            w3c = w3c_propagation()
            accepted = 0
            for tp, records in batches.items():
                part = self._partitions.get(tp)
                if part is None or part.revoked:
                    continue
                for record in records:
                    self._accept(record, part, now, recording, w3c)
                accepted += len(records)
            if accepted:
                self._idle.clear()
                self.metrics.received.inc(accepted)
                await self._notify_ready()  # one wake-up per fetch, not one task per record

    def _process_span(
        self, record: ConsumerRecord[bytes, bytes], recording: bool, w3c: bool
    ) -> Span:
        """The record's ``process {topic}`` span, a child of the upstream context.

        When nothing records spans (no SDK, or one without processors), it is only a new
        span id in the upstream trace, which the outputs' ``traceparent`` carries on.
        """
        parent_context: Context | None = None
        if w3c:
            parent = span_context_from_headers(record.headers)
        else:
            parent_context = context_from_headers(record.headers)
            parent = trace.get_current_span(parent_context).get_span_context()
        if not recording:
            return NonRecordingSpan(child_span_context(parent))
        if parent_context is None:
            parent_context = (
                trace.set_span_in_context(NonRecordingSpan(parent), Context())
                if parent is not None
                else Context()
            )
        return self._tracer.start_span(
            f"process {record.topic}",
            context=parent_context,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "messaging.kafka.message.key": (record.key or b"").decode("utf-8", "replace"),
                "messaging.consumer.group.name": self.group_id,
            },
        )

    def _accept(
        self,
        record: ConsumerRecord[bytes, bytes],
        part: _Partition,
        now: float,
        recording: bool,
        w3c: bool,
    ) -> None:
        part.pending.add(record.offset)
        part.next_offset = record.offset + 1
        self._in_flight += 1
        headers = None if recording or not w3c else child_trace_headers(record.headers)
        if headers is not None:
            # Nothing records spans: the new span is only the ids in its outputs' headers.
            job = _Job(record, part, INVALID_SPAN, now, headers=headers)
        else:
            job = _Job(record, part, self._process_span(record, recording, w3c), now)
        try:
            job.event = self.stage.parse(record.value or b"")
            job.batch_key = self.stage.batch_key(job.event)
        except Exception as exc:  # invalid input never crashes the stage
            self._spawn(self._dead_letter(job, exc))
            return
        self._ready.append(job)

    async def _notify_ready(self) -> None:
        async with self._ready_changed:
            self._ready_changed.notify_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- batching and work ---------------------------------------------------------------

    def _compatible(self, first: _Job) -> list[_Job]:
        """``first`` and the next ready records that may share its batch, in order."""
        limit = self.config.max_batch
        if first.alone or first.batch_key is None or limit == 1:
            return [first]
        key = first.batch_key
        batch = []
        for job in self._ready:
            if not job.alone and job.batch_key == key:
                batch.append(job)
                if len(batch) == limit:
                    break
        return batch

    async def _next_batch(self) -> list[_Job] | None:
        async with self._ready_changed:
            while not self._ready:
                if self._stopping:
                    return None
                await self._ready_changed.wait()
            first = self._ready[0]
            deadline = first.received_at + self.config.max_wait_ms / 1000
            batch = self._compatible(first)
            while 1 < self.config.max_batch and len(batch) < self.config.max_batch:
                remaining = deadline - time.monotonic()
                if first.alone or first.batch_key is None or remaining <= 0 or self._stopping:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready_changed.wait(), remaining)
                if not self._ready or self._ready[0] is not first:
                    break  # the revoke path took it away
                batch = self._compatible(first)
            if self._ready[len(batch) - 1] is batch[-1]:
                del self._ready[: len(batch)]  # the usual case: the batch is the head
            else:
                taken = set(map(id, batch))
                self._ready = [j for j in self._ready if id(j) not in taken]
            return batch

    async def _worker_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.partition.revoked]
            for job in batch:
                if job.partition.revoked:
                    self._release(job, completed=False)
            if not live:
                continue
            for job in live:
                job.partition.running += 1
            try:
                results = await self._run_batch(live)
            except BaseException:
                self._end_running(live)
                raise
            # Publishing and waiting for the broker's acks go on in a tracked task while
            # this worker takes its next batch; the records stay in flight until acked.
            self._spawn(self._complete(live, results))

    def _end_running(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.partition.running -= 1
        self._batch_finished.set()

    async def _run_batch(self, jobs: list[_Job]) -> list[ItemResult]:
        """Run the handler on ``jobs`` in the thread pool; one result per job."""
        assert self._loop is not None
        for job in jobs:
            job.attempts += 1
        self.metrics.batch_size.observe(len(jobs))
        batch_span = None
        recording = spans_recorded(self._tracer_provider)
        if len(jobs) > 1 and recording:
            batch_span = self._tracer.start_span(
                f"batch {self.stage.name}",
                links=[
                    Link(j.span.get_span_context())
                    for j in jobs
                    if j.span.get_span_context().is_valid
                ],
                attributes={"genseg.batch.size": len(jobs)},
            )
        ctx = StageContext(
            blob=self.blob,
            topics=self.topics,
            settings=self.settings,
            emit=lambda output, item: self._emit_threadsafe(output, jobs, item),
            attempt=max(j.attempts for j in jobs),
        )
        events = [j.event for j in jobs]
        started = time.monotonic()
        call = self._loop.run_in_executor(self._executor, self.stage.handle, events, ctx)
        results: list[ItemResult]
        try:
            results = list(await asyncio.wait_for(call, self.config.job_timeout_s))
            if len(results) != len(jobs):
                raise RuntimeError(
                    f"handler returned {len(results)} results for {len(jobs)} events"
                )
        except TimeoutError:
            results = [JobTimeout(f"handler ran past {self.config.job_timeout_s}s")] * len(jobs)
        except Exception as exc:
            log.warning(
                "stage %s handler raised for a batch of %d: %r", self.stage.name, len(jobs), exc
            )
            results = [exc] * len(jobs)
        finally:
            self.metrics.handler_seconds.observe(time.monotonic() - started)
            if batch_span is not None:
                batch_span.end()
        if recording and ctx.phases:
            self._replay_phases(ctx, jobs)
        return results

    def _replay_phases(self, ctx: StageContext, jobs: list[_Job]) -> None:
        """Turn the handler's timed phases into child spans of each record they served."""
        for index, job in enumerate(jobs):
            if not job.span.get_span_context().is_valid:
                continue  # accepted while nothing recorded spans: its ids are in its headers
            spans: dict[int, Span] = {}
            for number, phase in enumerate(ctx.phases):
                if phase.item not in (None, index) or not phase.end_ns:
                    continue
                parent_span = spans.get(phase.parent) if phase.parent is not None else None
                parent = trace.set_span_in_context(parent_span or job.span)
                span = self._tracer.start_span(
                    phase.name,
                    context=parent,
                    start_time=phase.start_ns,
                    attributes=phase.attributes,
                )
                span.end(end_time=phase.end_ns)
                spans[number] = span

    async def _complete(self, jobs: list[_Job], results: list[ItemResult]) -> None:
        """Send a finished batch's outputs in order, then settle each record on its acks."""
        try:
            sent: list[tuple[_Job, list[asyncio.Future[Any]]]] = []
            for job, result in zip(jobs, results, strict=True):
                if isinstance(result, BaseException):
                    await self._failed(job, result)
                    continue
                try:
                    sent.append((job, await self._send(job, result)))
                except Exception as exc:  # broker trouble: retried, outputs overwrite
                    await self._failed(job, exc)
            done: list[_Job] = []
            for job, futures in sent:
                try:
                    for number, future in enumerate(futures):
                        try:
                            await future
                        except BaseException:
                            for rest in futures[number + 1 :]:
                                rest.add_done_callback(_retrieve)
                            raise
                except Exception as exc:
                    await self._failed(job, exc)
                    continue
                done.append(job)
            if done:
                self._processed(done)
        finally:
            self._end_running(jobs)

    def _processed(self, jobs: list[_Job]) -> None:
        """Count and release records whose outputs the broker acknowledged (per batch)."""
        now = time.monotonic()
        tenants: dict[str | None, int] = {}
        observe = self.metrics.latency.observe
        for job in jobs:
            observe(now - job.received_at)
            tenant = tenant_of(job.event, job.record.value)
            tenants[tenant] = tenants.get(tenant, 0) + 1
            self._release(job, completed=True)
        self.metrics.processed.inc(len(jobs))
        for tenant, count in tenants.items():
            self.metrics.tenant_outcome(tenant, "processed", count)

    def _headers(self, job: _Job) -> list[tuple[str, bytes]]:
        """The trace headers of ``job``'s outputs: its process span's context."""
        if job.headers is None:
            job.headers = (
                traceparent_headers(job.span.get_span_context())
                if w3c_propagation()
                else headers_from_context(trace.set_span_in_context(job.span, Context()))
            )
        return job.headers

    async def _send(self, job: _Job, outputs: list[Output]) -> list[asyncio.Future[Any]]:
        """Enqueue ``outputs`` with the record's trace context; futures resolve on ack."""
        headers = job.headers if job.headers is not None else self._headers(job)
        send = self._publisher.producer.send  # Publisher.send, one coroutine less per record
        futures = []
        for out in outputs:  # a loop, not an async comprehension (a coroutine of its own)
            futures.append(
                await send(
                    out.topic,
                    value=out.event.to_json_bytes(),
                    key=out.record_key.encode("utf-8"),
                    headers=headers,
                )
            )
        return futures

    async def _publish(self, job: _Job, outputs: list[Output]) -> None:
        await asyncio.gather(*await self._send(job, outputs))

    def _emit_threadsafe(self, output: Output, jobs: list[_Job], item: int | None) -> None:
        """Called from the handler thread: publish a side record, fire-and-forget."""
        assert self._loop is not None
        job = jobs[item] if item is not None and 0 <= item < len(jobs) else jobs[0]

        async def send() -> None:
            try:
                future = await self._publisher.send(
                    output.topic,
                    output.event.to_json_bytes(),
                    key=output.record_key,
                    headers=self._headers(job),
                )
                await future
            except Exception as exc:  # progress is best effort
                log.debug("side record to %s not sent: %s", output.topic, exc)

        self._loop.call_soon_threadsafe(self._spawn, send())

    # --- failures ---------------------------------------------------------------------

    async def _failed(self, job: _Job, exc: BaseException) -> None:
        kind = error_type_of(exc)
        self.metrics.fail(kind)
        job.span.record_exception(exc)
        if is_permanent(exc) or job.attempts >= self.config.max_attempts:
            await self._dead_letter(job, exc)
            return
        if self._stopping:  # leave it uncommitted: the partition's next owner retries it
            self._release(job, completed=False)
            return
        delay = min(
            self.config.backoff_initial_ms * 2 ** (job.attempts - 1), self.config.backoff_max_ms
        )
        log.info(
            "stage %s: %s on %s, retry %d in %d ms",
            self.stage.name,
            kind,
            job.record.key,
            job.attempts,
            delay,
        )
        self.metrics.retried.inc()
        task = asyncio.create_task(self._retry_later(job, delay / 1000))
        self._retry_tasks.add(task)
        task.add_done_callback(self._retry_tasks.discard)

    async def _retry_later(self, job: _Job, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            self._release(job, completed=False)
            raise
        if job.partition.revoked:
            self._release(job, completed=False)
            return
        job.alone = True
        async with self._ready_changed:
            self._ready.insert(0, job)
            self._ready_changed.notify_all()

    async def _dead_letter(self, job: _Job, exc: BaseException) -> None:
        """Publish the terminal dead-letter event; retried until the broker takes it."""
        event = job.event
        request_id = getattr(exc, "request_id", None)
        image_index = None
        if event is not None:
            request_id = self.stage.request_id(event)
            image_index = self.stage.image_index(event)
        if request_id is None and job.record.key:
            request_id = job.record.key.decode("utf-8", "replace")[:128]
        tenant = tenant_of(event, job.record.value)
        dead = DeadLetterEvent.build(
            stage=self.stage.name,
            error_type=error_type_of(exc),
            message=str(exc) or type(exc).__name__,
            attempts=job.attempts,
            source=job.source,
            raw=job.record.value or b"",
            request_id=request_id,
            image_index=image_index,
            tenant=tenant,
        )
        job.span.set_status(Status(StatusCode.ERROR, dead.error.message[:200]))
        delay = 0.2
        while True:
            try:
                await self._publish(job, [Output(self.topics.dlq, dead, key=request_id or "")])
                break
            except Exception as publish_exc:
                if self._stopping:
                    self._release(job, completed=False)
                    return
                log.warning("dead-letter publish failed, retrying: %s", publish_exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.warning(
            "stage %s dead-lettered %s: %s: %s",
            self.stage.name,
            request_id,
            dead.error.type,
            dead.error.message[:200],
        )
        self.metrics.dead_lettered.inc()
        self.metrics.tenant_outcome(tenant, dead.error.type)
        self._release(job, completed=True)

    # --- offsets, commits, rebalance ------------------------------------------------------

    def _release(self, job: _Job, *, completed: bool) -> None:
        """Forget ``job``; when ``completed``, its offset may be committed."""
        # An unfinished offset stays pending: the commit holds below it until revoke.
        if completed and not job.partition.revoked:
            job.partition.pending.discard(job.record.offset)
        job.span.end()
        self._in_flight -= 1
        if self._in_flight <= self._resume_at:
            self._room.set()
            if self._in_flight == 0:
                self._idle.set()

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for tp, part in self._partitions.items():
            if only is not None and tp not in only:
                continue
            target = part.committable()
            if target is not None and (part.committed is None or target > part.committed):
                offsets[tp] = target
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.warning("commit of %s failed: %s", offsets, exc)
            return
        self.metrics.commits.inc()
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval_ms / 1000)
            await self._commit()
            self.commit_rounds += 1

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lag_interval_s)
            if self._consumer is None:
                continue
            for tp, part in list(self._partitions.items()):
                high = self._consumer.highwater(tp)
                if high is None:
                    continue
                if part.committed is None:
                    # Nothing committed by this member yet: the group's offset on the broker
                    # (from an earlier member) is the base, not 0.
                    with contextlib.suppress(KafkaError, IllegalStateError):
                        part.committed = await self._consumer.committed(tp)
                if part.committed is not None:
                    self.metrics.set_lag(tp.topic, tp.partition, high - part.committed)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._partitions[tp] = _Partition(tp)
        log.info("stage %s assigned %s", self.stage.name, sorted(p.partition for p in assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop taking work from ``revoked``, let in-flight finish (bounded), commit, forget."""
        if not revoked:
            return
        parts = [self._partitions[tp] for tp in revoked if tp in self._partitions]
        async with self._ready_changed:
            dropped = [j for j in self._ready if j.partition.tp in revoked]
            self._ready = [j for j in self._ready if j.partition.tp not in revoked]
            self._ready_changed.notify_all()
        # Running batches get a bounded time to finish so their offsets can be committed.
        deadline = time.monotonic() + self.config.rebalance_drain_s
        while any(p.running for p in parts) and (remaining := deadline - time.monotonic()) > 0:
            self._batch_finished.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_finished.wait(), remaining)
        await self._commit(only=revoked)
        for part in parts:
            part.revoked = True
            self._partitions.pop(part.tp, None)
            self.metrics.forget_partition(part.tp.topic, part.tp.partition)
        for job in dropped:
            self._release(job, completed=False)
        log.info("stage %s revoked %s", self.stage.name, sorted(p.partition for p in revoked))
