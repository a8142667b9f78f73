"""``genseg dlq replay``: re-publish dead-lettered records to the topic they came from.

Reads the dead-letter topic from its beginning up to its end at the time of the
call, so a replay that fails again (and is dead-lettered anew) is not replayed
twice in one run. Stages write outputs to deterministic blob keys and consumers
dedupe by id, so replaying a request that meanwhile succeeded is harmless. A replayed
record is the original value, so it keeps its ``tenant`` (and its blobs' tenant folder);
a request that was deleted is not replayed (its dead letter carries no value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from plumbing.kafka import make_consumer
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import DeadLetterEvent, InvalidEvent, parse_event

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    replayed: int = 0
    skipped: int = 0
    lines: list[str] = field(default_factory=list)


async def replay_dead_letters(
    settings: Settings,
    *,
    request_id: str | None = None,
    include_invalid: bool = False,
    dry_run: bool = False,
) -> ReplayReport:
    """Replay the dead letters (of ``request_id``, or all) present now; see the module doc."""
    report = ReplayReport()
    dlq = settings.topics.dlq
    consumer = make_consumer(settings, enable_auto_commit=False)
    publisher = Publisher(settings)
    try:  # one that failed to start is stopped too: aiokafka warns of unclosed clients
        await consumer.start()
        await publisher.start()
        numbers = sorted(consumer.partitions_for_topic(dlq) or [])
        partitions = [TopicPartition(dlq, p) for p in numbers]
        if not partitions:
            report.lines.append(f"topic {dlq} has no partitions (does it exist?)")
            return report
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        sent = set()
        while remaining:
            for tp, records in (await consumer.getmany(*remaining, timeout_ms=1000)).items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    await _replay_one(
                        record.value or b"", record.headers, publisher, report, sent,
                        request_id=request_id, include_invalid=include_invalid, dry_run=dry_run,
                    )  # fmt: skip
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await publisher.stop()
        await consumer.stop()
    return report


async def _replay_one(
    raw: bytes,
    headers: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]],
    publisher: Publisher,
    report: ReplayReport,
    sent: set[tuple[str, int, int]],
    *,
    request_id: str | None,
    include_invalid: bool,
    dry_run: bool,
) -> None:
    try:
        dead = parse_event(raw, DeadLetterEvent)
    except InvalidEvent as exc:
        report.skipped += 1
        report.lines.append(f"skip undecodable dead letter: {exc}")
        return
    if request_id is not None and dead.id != request_id:
        return
    source = (dead.source.topic, dead.source.partition, dead.source.offset)
    topic, partition, offset = source
    label = f"{dead.id} ({dead.stage}: {dead.error.type}) from {topic}[{partition}]@{offset}"
    if source in sent:
        return  # the same source record dead-lettered twice: replay it once
    if dead.error.type == "validation" and not include_invalid:
        report.skipped += 1
        report.lines.append(f"skip {label}: invalid input would fail again")
        return
    if dead.error.type == "deleted":
        report.skipped += 1
        report.lines.append(f"skip {label}: the request was deleted")
        return
    if dead.value_truncated:
        report.skipped += 1
        report.lines.append(f"skip {label}: its value was truncated in the dead letter")
        return
    sent.add(source)
    report.replayed += 1
    report.lines.append(f"{'would replay' if dry_run else 'replay'} {label}")
    if not dry_run:
        trace_headers = [(k, v) for k, v in headers if k in ("traceparent", "tracestate")]
        future = await publisher.send(
            dead.source.topic, dead.value.encode("utf-8"), key=dead.id, headers=trace_headers
        )
        await future
