"""Offset bookkeeping: which partitions this member owns, and how far each may be committed.

At-least-once with contiguous-prefix commits: a partition's offset is committed
only past records whose outputs the broker acknowledged, and only up to the first
record that is not done yet (a slow record at offset k holds the commit at k).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumers.metrics import StageMetrics

log = logging.getLogger(__name__)


@dataclass
class PartitionState:
    """One assigned partition: the offsets accepted and not yet done."""

    tp: TopicPartition
    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset fetched
    committed: int | None = None
    running: int = 0  # records inside a handler call or publishing their outputs
    revoked: bool = False

    def accept(self, offset: int) -> None:
        self.pending.add(offset)
        self.next_offset = offset + 1

    def done(self, offset: int) -> None:
        """``offset``'s outputs are acknowledged (or it was dead-lettered): committable."""
        # After a revoke nothing more is committed by this member: the next owner redoes it.
        if not self.revoked:
            self.pending.discard(offset)

    def committable(self) -> int | None:
        """The offset to commit: the first one not done, or one past the last fetched."""
        return min(self.pending) if self.pending else self.next_offset


class Offsets:
    """The partitions of one member and their commits (see the module docstring)."""

    def __init__(self, metrics: StageMetrics) -> None:
        self.metrics = metrics
        self.partitions: dict[TopicPartition, PartitionState] = {}

    def assign(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            self.partitions[tp] = PartitionState(tp)

    def get(self, tp: TopicPartition) -> PartitionState | None:
        return self.partitions.get(tp)

    def owned(self, tps: Iterable[TopicPartition]) -> list[PartitionState]:
        return [self.partitions[tp] for tp in tps if tp in self.partitions]

    def forget(self, parts: Iterable[PartitionState]) -> None:
        """Drop revoked partitions: nothing of theirs is committed by this member again."""
        for part in parts:
            part.revoked = True
            self.partitions.pop(part.tp, None)
            self.metrics.forget_partition(part.tp.topic, part.tp.partition)

    def committed(self) -> dict[TopicPartition, int | None]:
        """What this member last committed per assigned partition."""
        return {tp: p.committed for tp, p in self.partitions.items()}

    async def commit(
        self, consumer: AIOKafkaConsumer, only: set[TopicPartition] | None = None
    ) -> None:
        """Commit every partition (or ``only`` those) that moved since its last commit."""
        offsets: dict[TopicPartition, int] = {}
        for tp, part in self.partitions.items():
            if only is not None and tp not in only:
                continue
            target = part.committable()
            if target is not None and (part.committed is None or target > part.committed):
                offsets[tp] = target
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            log.warning("commit of %s failed: %s", offsets, exc)
            return
        self.metrics.commits.inc()
        for tp, offset in offsets.items():
            if tp in self.partitions:
                self.partitions[tp].committed = offset

    async def report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Set the lag gauge of each owned partition: high watermark minus committed."""
        for tp, part in list(self.partitions.items()):
            high = consumer.highwater(tp)
            if high is None:
                continue
            if part.committed is None:
                # Nothing committed by this member yet: the group's offset on the broker
                # (from an earlier member) is the base, not 0.
                with contextlib.suppress(KafkaError, IllegalStateError):
                    part.committed = await consumer.committed(tp)
            if part.committed is not None:
                self.metrics.set_lag(tp.topic, tp.partition, high - part.committed)
