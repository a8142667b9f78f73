"""Topic administration: create the contract's topics, idempotently."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from genseg.settings import Settings

log = logging.getLogger(__name__)


async def ensure_topics(
    settings: Settings,
    *,
    partitions: int = 4,
    replication_factor: int = 1,
    names: list[str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names of those created.

    By default: the contract's topics and the internal ones (``Topics.internal``).
    """
    wanted = names or [*settings.topics.all(), *settings.topics.internal()]
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(name, partitions, replication_factor) for name in missing]
                )
            except TopicAlreadyExistsError:
                log.info("topics created concurrently by another process: %s", missing)
        return missing
    finally:
        await admin.close()
