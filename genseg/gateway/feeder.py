"""Feeds the view from the topics, and tells the watchers of a request what changed.

One consumer without a group (it commits nothing and takes no partitions from anyone)
reads every partition of the topics below from the offsets stored in the view, so a
restart resumes there and a new gateway (or a lost view) starts from the beginning.
Each ``getmany`` batch is applied in one transaction; only then are the watchers of
the requests it touched woken, so what they read back from the view is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from genseg.gateway.metrics import GatewayMetrics
from genseg.gateway.view import Record, StoredEvent, View
from plumbing.fetch_wait import FetchWait
from plumbing.kafka import make_consumer
from plumbing.settings import Settings
from schemas import InvalidEvent, decode_record

log = logging.getLogger(__name__)

#: What the view is built from (short names).
VIEW_TOPICS = (
    "prompts", "progress", "images", "masks", "assets", "dlq", "webhooks", "deletions",
)  # fmt: skip
#: How often the feeder looks for partitions added to its topics.
REASSIGN_INTERVAL_S = 30.0


@dataclass
class Change:
    """What one applied batch changed for one request."""

    events: list[StoredEvent] = field(default_factory=list)
    #: The request's new state, when the batch changed it.
    state: str | None = None
    #: The gateway is stopping: watchers end (a client reconnects to another gateway).
    closing: bool = False


class Hub:
    """Live fan-out from the feeder to the watchers of each request (SSE streams, waits)."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[Change]]] = {}
        self.closed = False

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Queue[Change]]:
        """A queue of the request's changes for the block. Watch first, then read the
        view: a change committed in between is in both, and the stream's sequence
        numbers drop the repeat."""
        queue: asyncio.Queue[Change] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(Change(closing=True))
        self._watchers.setdefault(request_id, set()).add(queue)
        try:
            yield queue
        finally:
            watchers = self._watchers.get(request_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[request_id]

    def publish(self, request_id: str, change: Change) -> None:
        for queue in self._watchers.get(request_id, ()):
            queue.put_nowait(change)

    def close(self) -> None:
        """End every watch, now and from now on."""
        self.closed = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(Change(closing=True))

    def watching(self) -> int:
        return sum(len(queues) for queues in self._watchers.values())


class Feeder:
    """Reads :data:`VIEW_TOPICS` into a :class:`View` and publishes changes to a :class:`Hub`."""

    def __init__(
        self,
        settings: Settings,
        view: View,
        hub: Hub,
        blob_key: Callable[[str], str | None],
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.view = view
        self.hub = hub
        self.blob_key = blob_key
        self.metrics = metrics
        self._short = {settings.topics.name(t): t for t in VIEW_TOPICS}
        self._consumer: AIOKafkaConsumer | None = None
        self._fetch_wait: FetchWait | None = None
        self._task: asyncio.Task[None] | None = None
        #: End offsets when the feeder started, of the partitions not yet read past them.
        self._targets: dict[TopicPartition, int] | None = None
        self.caught_up = asyncio.Event()

    async def start(self) -> None:
        self._consumer = make_consumer(
            self.settings,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="genseg-gateway",
            metadata_max_age_ms=int(REASSIGN_INTERVAL_S * 1000),
        )
        await self._consumer.start()
        self._fetch_wait = FetchWait.from_settings(self._consumer, self.settings)
        self._task = asyncio.create_task(self._run(), name="genseg-gateway-feeder")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the feeder is not started")
        return self._consumer

    async def _run(self) -> None:
        next_check = 0.0  # assign at once
        reseek = False
        while True:
            try:
                if reseek or time.monotonic() >= next_check:
                    await self._assign(reseek=reseek)
                    next_check, reseek = time.monotonic() + REASSIGN_INTERVAL_S, False
                assert self._fetch_wait is not None
                batches = await self._fetch_wait.getmany(timeout_ms=1000, max_records=2000)
                if batches:
                    self._apply(batches)
                await self._check_caught_up()
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker away, a full disk...: log, back off, go on
                log.exception("the gateway's view feeder failed; retrying in 1 s")
                # Records fetched but not applied: read again from what the view holds.
                reseek = True
                await asyncio.sleep(1.0)

    async def _partitions(self) -> list[TopicPartition]:
        """Every partition of the view's topics, waiting until they all exist."""
        waited = False
        while True:
            # No public call refreshes a consumer's own metadata (as in consumers.subscriber).
            await self.consumer._client.force_metadata_update()
            found: list[TopicPartition] = []
            missing = []
            for topic in self._short:
                numbers = self.consumer.partitions_for_topic(topic)
                if numbers:
                    found += [TopicPartition(topic, p) for p in sorted(numbers)]
                else:
                    missing.append(topic)
            if not missing:
                return found
            if not waited:
                log.warning("waiting for topics %s (run `genseg topics create`)", missing)
                waited = True
            await asyncio.sleep(1.0)

    async def _assign(self, *, reseek: bool = False) -> None:
        """Assign every partition (again when some were added, or ``reseek``) at the
        offsets the view holds."""
        partitions = await self._partitions()
        if set(partitions) == set(self.consumer.assignment()) and not reseek:
            return
        ends = await self.consumer.end_offsets(partitions)
        stored = self.view.offsets()
        if any(stored.get((tp.topic, tp.partition), 0) > ends[tp] for tp in partitions):
            # The view has read further than the topics go: they were recreated (or this
            # is another broker). The topics are the truth: start over.
            log.warning("the view %s is ahead of the topics; rebuilding it", self.view.path)
            self.view.reset()
            stored = {}
        self.consumer.assign(partitions)
        for tp in partitions:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        if self._targets is None:
            self._targets = {tp: int(offset) for tp, offset in ends.items()}
        log.info("gateway view: reading %d partitions from %s", len(partitions), self.view.path)

    def _apply(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        records: list[Record] = []
        ends: dict[tuple[str, int], int] = {}
        for tp, batch in batches.items():
            short = self._short[tp.topic]
            for record in batch:
                decoded = self._decode(short, record)
                if decoded is not None:
                    records.append(decoded)
            if batch:
                ends[(tp.topic, tp.partition)] = batch[-1].offset + 1
                self.metrics.view_records.labels(short).inc(len(batch))
        # Terminal events last: a stream that ends on them has seen the rest of the batch.
        records.sort(key=lambda r: r.topic in ("assets", "dlq"))
        new_events, changed = self.view.apply(records, ends, self.blob_key)
        for request_id in new_events.keys() | changed:
            row = self.view.request(request_id) if request_id in changed else None
            change = Change(new_events.get(request_id, []), row.state if row else None)
            self.hub.publish(request_id, change)

    @staticmethod
    def _decode(short: str, record: ConsumerRecord[bytes, bytes]) -> Record | None:
        raw = record.value or b""
        try:
            event = decode_record(short, raw)
        except InvalidEvent as exc:  # others' garbage on a topic: not the view's business
            log.debug("skipping %s@%d:%d: %s", short, record.partition, record.offset, exc)
            return None
        text = raw.decode("utf-8")
        return Record(short, record.partition, record.offset, event, text, record.timestamp)

    async def _check_caught_up(self) -> None:
        if self.caught_up.is_set() or self._targets is None:
            return
        for tp, end in list(self._targets.items()):
            # The position, not the last record read: it also passes deleted records.
            if await self.consumer.position(tp) < end:
                return
            del self._targets[tp]
        log.info("gateway view caught up with the topics")
        self.caught_up.set()
