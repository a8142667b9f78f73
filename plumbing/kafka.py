"""The one place genseg builds Kafka clients, and topic administration.

Every producer, consumer and admin client of genseg is made here, from
:class:`~plumbing.settings.Settings` plus the caller's options, so connection and
security settings are applied the same way everywhere, and the SASL password
(which aiokafka logs at DEBUG inside its authentication token) is redacted from
the logs of any process that builds a client with it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from plumbing.settings import Settings

log = logging.getLogger(__name__)


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options of every client (``Settings.kafka_kwargs``), with the SASL
    password registered for redaction in aiokafka's logs."""
    kwargs = settings.kafka_kwargs()
    password = kwargs.get("sasl_plain_password")
    if password:
        _REDACTOR.add(password)
    return kwargs


def make_consumer(settings: Settings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """An aiokafka consumer of ``topics`` (or none: assign or subscribe later).

    ``fetch_max_wait_ms`` defaults to ``KAFKA_FETCH_MAX_WAIT_MS``; other options are
    aiokafka's. Call inside the event loop that will use it.
    """
    options.setdefault("fetch_max_wait_ms", settings.kafka_fetch_max_wait_ms)
    return AIOKafkaConsumer(*topics, **options, **client_kwargs(settings))


#: Producer defaults of every genseg publisher. Idempotence stays off: not every
#: Kafka-compatible broker supports InitProducerId (tansu does not), and correctness
#: never depends on it (deterministic blob keys, consumers dedupe by id).
#:
#: No linger: aiokafka keeps one produce request in flight per broker, and records sent
#: while it is out wait in the accumulator and leave together in the next one, so a
#: burst batches by itself. A linger only held back the record that found nothing in
#: flight, i.e. every hop at low load: 2 ms on each of a request's three produce round
#: trips (the client's prompt, the segmenter's masks, then its terminal asset event).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 0,
    "enable_idempotence": False,
    "request_timeout_ms": 30_000,
}


def make_producer(settings: Settings, **options: Any) -> AIOKafkaProducer:
    """An aiokafka producer with :data:`PRODUCER_DEFAULTS` under ``options``."""
    return AIOKafkaProducer(**{**PRODUCER_DEFAULTS, **options}, **client_kwargs(settings))


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_kwargs(settings))


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
    admin = make_admin(settings)
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


class _RedactSecrets(logging.Filter):
    """Replaces known secret values in log records.

    aiokafka logs every request at DEBUG, the SASL/PLAIN token (with the password)
    too. The CLI keeps aiokafka at WARNING, but a program that uses genseg as a
    library may turn DEBUG on: the password must not reach its logs either.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, password: str) -> None:
        # as written, and as it appears inside the repr() of the bytes token
        self.secrets |= {password, repr(password.encode("utf-8"))[2:-1]}
        conn = logging.getLogger("aiokafka.conn")
        if self not in conn.filters:
            conn.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it as usual, later
            return True
        if any(secret in message for secret in self.secrets):
            for secret in sorted(self.secrets, key=len, reverse=True):
                message = message.replace(secret, "**********")
            record.msg, record.args = message, None
        return True


#: One filter for the process: aiokafka's logger is global, like the logging module.
_REDACTOR = _RedactSecrets()
