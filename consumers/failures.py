"""What happens to a record whose handler failed: retry later, or dead-letter now.

Classification is :mod:`plumbing.errors`' (one taxonomy for every stage): a permanent
error, or the last allowed attempt, ends in a dead-letter event; anything else is
retried with exponential backoff, alone (outside any batch) and first in line.
The dead letter is the record's terminal event: it is published until the broker
takes it (or the runtime stops, leaving the record to the partition's next owner).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from opentelemetry.trace import Status, StatusCode
from pydantic import BaseModel, TypeAdapter, ValidationError

from consumers.batching import Job, ReadyQueue
from consumers.config import RuntimeConfig
from consumers.fetcher import InFlight
from consumers.metrics import StageMetrics
from consumers.outputs import OutputSender
from consumers.stage import Output, Stage
from plumbing.errors import TransientError, error_type_of, is_permanent
from schemas import DeadLetterEvent, Topics
from schemas.events import TenantId

log = logging.getLogger(__name__)


class JobTimeout(TransientError):
    """A handler call ran past ``job_timeout_s``."""

    error_type = "timeout"


_TENANT_ID: TypeAdapter[str] = TypeAdapter(TenantId)


def _json_field(raw: bytes | None, name: str) -> Any:
    """Field ``name`` of a record value that is a JSON object, else None."""
    try:
        data = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return None
    return data.get(name) if isinstance(data, dict) else None


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
    tenant = _json_field(raw, "tenant")
    try:
        return _TENANT_ID.validate_python(tenant) if isinstance(tenant, str) else None
    except ValidationError:
        return None


def image_index_of(raw: bytes | None) -> int | None:
    """The ``image_index`` of a record that could not be parsed, when its JSON has a
    usable one: its dead letter then ends that image only, not the whole request."""
    index = _json_field(raw, "image_index")
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else None


class Failures:
    """Retries and dead letters of one runtime (see the module docstring)."""

    def __init__(
        self,
        stage: Stage[Any],
        config: RuntimeConfig,
        topics: Topics,
        metrics: StageMetrics,
        queue: ReadyQueue,
        in_flight: InFlight,
        sender: OutputSender,
    ) -> None:
        self.stage = stage
        self.config = config
        self.topics = topics
        self.metrics = metrics
        self.queue = queue
        self.in_flight = in_flight
        self.sender = sender
        self.dead_letters = topics.name(stage.dead_letter_topic)
        self.stopping = False
        self._retries: set[asyncio.Task[None]] = set()

    async def failed(self, job: Job, exc: BaseException) -> None:
        """Dead-letter ``job`` now, or schedule its retry."""
        kind = error_type_of(exc)
        self.metrics.fail(kind)
        job.span.record_exception(exc)
        if is_permanent(exc) or job.attempts >= self.config.max_attempts:
            await self.dead_letter(job, exc)
            return
        if self.stopping:  # leave it uncommitted: the partition's next owner retries it
            self.in_flight.settle(job, completed=False)
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
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def cancel_retries(self) -> list[asyncio.Task[None]]:
        """Cancel the waiting retries (on stop); their records stay uncommitted."""
        tasks = list(self._retries)
        for task in tasks:
            task.cancel()
        return tasks

    async def _retry_later(self, job: Job, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            self.in_flight.settle(job, completed=False)
            raise
        if job.partition.revoked:
            self.in_flight.settle(job, completed=False)
            return
        self.in_flight.requeue(job)
        await self.queue.put_front(job)

    async def dead_letter(self, job: Job, exc: BaseException) -> None:
        """Publish the terminal dead-letter event; retried until the broker takes it."""
        event, raw = job.event, job.record.value
        if not getattr(exc, "keeps_value", True):  # a deleted request: no copy of it stays
            raw = b""
        request_id = getattr(exc, "request_id", None)
        if event is not None:
            request_id = self.stage.request_id(event)
            image_index = self.stage.image_index(event)
        else:
            image_index = image_index_of(raw) if self.stage.per_image else None
        if request_id is None and job.record.key:
            request_id = job.record.key.decode("utf-8", "replace")[:128]
        tenant = tenant_of(event, raw)
        dead = DeadLetterEvent.build(
            stage=self.stage.name,
            error_type=error_type_of(exc),
            message=str(exc) or type(exc).__name__,
            attempts=job.attempts,
            source=job.source,
            raw=raw or b"",
            request_id=request_id,
            image_index=image_index,
            tenant=tenant,
        )
        job.span.set_status(Status(StatusCode.ERROR, dead.error.message[:200]))
        delay = 0.2
        while True:
            try:
                await self.sender.publish(
                    job, [Output(self.dead_letters, dead, key=request_id or "")]
                )
                break
            except Exception as publish_exc:
                if self.stopping:
                    self.in_flight.settle(job, completed=False)
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
        self.in_flight.settle(job, completed=True)
