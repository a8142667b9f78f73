"""The event publisher: key = request id, JSON value, ``traceparent`` header, delivery awaited."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from plumbing.kafka import make_producer
from plumbing.lifecycle import AsyncService
from plumbing.settings import Settings
from plumbing.telemetry import TRACER_NAME, headers_from_context, origin_context
from schemas import Event

log = logging.getLogger(__name__)


class Publisher(AsyncService):
    """Publishes contract events to Kafka.

    Each :meth:`publish` opens a ``send {topic}`` PRODUCER span (a child of
    ``context``, or of the current span) and carries it in the ``traceparent``
    header, so the consumers' spans join the same trace.

    Usage::

        async with Publisher(settings) as pub:
            await pub.publish(settings.topics.prompts, PromptEvent(id="r1", prompt="a cup"))
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        **producer_kwargs: Any,
    ) -> None:
        self.settings = settings
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        self._options = producer_kwargs
        self._producer: AIOKafkaProducer | None = None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("Publisher is not started")
        return self._producer

    async def start(self) -> None:
        if self._producer is None:
            # aiokafka clients bind to the running loop, so they are made here, not in __init__.
            producer = make_producer(self.settings, **self._options)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()  # a half-started client must not leak its connections
                raise
            self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None,
        headers: list[tuple[str, bytes]],
    ) -> asyncio.Future[RecordMetadata]:
        """Enqueue one raw record; the returned future resolves when the broker acknowledges it."""
        return await self.producer.send(
            topic,
            value=value,
            key=key.encode("utf-8") if key is not None else None,
            headers=headers,
        )

    async def publish(
        self,
        topic: str,
        event: Event,
        *,
        key: str | None = None,
        context: Context | None = None,
    ) -> RecordMetadata:
        """Publish ``event`` keyed by ``key`` (default: its ``id``) and wait for the ack."""
        record_key = key if key is not None else getattr(event, "id", None)
        with self._tracer.start_as_current_span(
            f"send {topic}",
            context=context,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
                "messaging.kafka.message.key": record_key or "",
            },
        ):
            future = await self.send(
                topic,
                event.to_json_bytes(),
                key=record_key,
                headers=headers_from_context(origin_context()),
            )
            return await future
