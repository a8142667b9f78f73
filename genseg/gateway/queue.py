"""``GET /v1/queue``: the lag and members of each stage's consumer group, and the view's
queued and running requests. What a load balancer or an autoscaler reads.

Lag is the records of a group's input topics not yet committed: end offset minus
committed offset, summed over partitions (a partition never committed counts from
the start of its log). Committed offsets are asked for by partition: not every
broker answers the "all partitions of the group" form (tansu does not). Members come
from DescribeGroups, asked one group at a time; a broker that cannot describe a group
leaves its members unknown (``state`` None), never failing the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from genseg.gateway.models import Member, QueueView, StageQueue
from genseg.gateway.view import View
from plumbing.kafka import make_admin
from plumbing.settings import Settings

log = logging.getLogger(__name__)

#: Stage (its group is ``{prefix}.{stage}``) -> the topics it consumes (short names).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "gen": ("prompts",),
    "seg": ("images",),
    "scene": ("scene-views",),
    "webhook-assets": ("assets",),
    "webhook-dlq": ("dlq",),
}
#: How long one answer is reused: a load balancer polling every second costs the
#: broker one round of requests per gateway and interval, not one per poll.
CACHE_S = 2.0
BROKER_TIMEOUT_S = 5.0


class QueueReader:
    """Reads group lag and members through an admin client and a consumer of the gateway."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, view: View) -> None:
        self.settings = settings
        self.consumer = consumer
        self.view = view
        self._admin: AIOKafkaAdminClient | None = None
        self._cached: tuple[float, list[StageQueue]] | None = None
        self._lock = asyncio.Lock()

    async def stop(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()

    async def read(self) -> QueueView:
        counts = self.view.state_counts()
        requests = {
            "queued": counts["queued"],
            "running": counts["generating"] + counts["segmenting"],
            **counts,
        }
        return QueueView(
            stages=await self._stages(),
            requests=requests,
            checked_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        )

    async def _stages(self) -> list[StageQueue]:
        async with self._lock:  # one broker round at a time; waiters get its answer
            if self._cached and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            stages = [await self._stage(stage, inputs) for stage, inputs in STAGE_INPUTS.items()]
            self._cached = (time.monotonic(), stages)
            return stages

    async def _admin_client(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            admin = make_admin(self.settings)
            await asyncio.wait_for(admin.start(), BROKER_TIMEOUT_S)
            self._admin = admin
        return self._admin

    async def _stage(self, stage: str, inputs: tuple[str, ...]) -> StageQueue:
        group = f"{self.settings.topic_prefix}.{stage}"
        out = StageQueue(stage=stage, group=group, lag=None)
        try:
            admin = await self._admin_client()
            out.lag = await asyncio.wait_for(self._lag(admin, group, inputs), BROKER_TIMEOUT_S)
        except Exception as exc:  # a topic not there yet, the broker away: unknown
            log.debug("lag of %s unknown: %r", group, exc)
        try:
            admin = await self._admin_client()
            described = await asyncio.wait_for(
                admin.describe_consumer_groups([group]), BROKER_TIMEOUT_S
            )
            for response in described:
                for entry in response.groups:
                    _error, _group, state, _ptype, _proto, members = entry[:6]
                    out.state = state or None
                    out.members = [_member(m) for m in members]
        except Exception as exc:  # an unknown group, or a broker that cannot describe it
            log.debug("members of %s unknown: %r", group, exc)
        return out

    async def _lag(self, admin: AIOKafkaAdminClient, group: str, inputs: tuple[str, ...]) -> int:
        partitions: list[TopicPartition] = []
        for short in inputs:
            topic = self.settings.topics.name(short)
            (meta,) = await admin.describe_topics([topic])
            if meta.get("error_code"):
                raise LookupError(f"topic {topic}: error {meta['error_code']}")
            partitions += [TopicPartition(topic, p["partition"]) for p in meta["partitions"]]
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        ends = await self.consumer.end_offsets(partitions)
        missing = [tp for tp in partitions if committed.get(tp) is None or committed[tp].offset < 0]
        starts = await self.consumer.beginning_offsets(missing) if missing else {}
        lag = 0
        for tp in partitions:
            done = starts[tp] if tp in starts else committed[tp].offset
            lag += max(0, ends[tp] - done)
        return lag


def _member(entry: tuple[object, ...]) -> Member:
    member_id, client_id, client_host, _metadata, assignment = entry[:5]
    partitions = 0
    if isinstance(assignment, bytes) and assignment:
        try:
            decoded = ConsumerProtocolMemberAssignment.decode(assignment)
            partitions = sum(len(numbers) for _topic, numbers in decoded.assignment)
        except Exception:  # another protocol's assignment: the count stays unknown (0)
            partitions = 0
    return Member(
        member_id=str(member_id), client_id=str(client_id), host=str(client_host),
        partitions=partitions,
    )  # fmt: skip
