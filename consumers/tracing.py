"""Tracing of the records a stage runtime processes (OpenTelemetry).

- a ``process {topic}`` CONSUMER span per record, child of the upstream context in
  its ``traceparent``; the record's outputs carry this span's context on;
- a ``batch {stage}`` span per handler call of several records, linking them;
- the handler's timed phases (``StageContext.phase``) replayed as child spans of
  every record they served, with their real start and end times.

When no span processor would see a span (:func:`plumbing.telemetry.spans_recorded`),
the ``process`` span is only a new span id in the upstream trace (made straight
from the header text with the default W3C propagator), and batch and phase spans
are skipped: per-record tracing then costs next to nothing.
"""

from __future__ import annotations

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link, NonRecordingSpan, Span, SpanKind

from consumers.batching import Job
from consumers.stage import StageContext
from plumbing.telemetry import (
    TRACER_NAME,
    child_span_context,
    child_trace_headers,
    context_from_headers,
    headers_from_context,
    span_context_from_headers,
    spans_recorded,
    traceparent_headers,
)

Headers = list[tuple[str, bytes]]


class RecordTracing:
    """The spans of one runtime's records (see the module docstring)."""

    def __init__(self, stage_name: str, group_id: str, provider: trace.TracerProvider | None):
        self.stage_name = stage_name
        self.group_id = group_id
        self._provider = provider
        self._tracer = trace.get_tracer(TRACER_NAME, tracer_provider=provider)

    def recording(self) -> bool:
        """Whether spans reach a processor now; asked once per fetch or batch."""
        return spans_recorded(self._provider)

    def start(
        self, record: ConsumerRecord[bytes, bytes], recording: bool, w3c: bool
    ) -> tuple[Span, Headers | None]:
        """The record's ``process`` span and, when nothing records spans and the W3C
        propagator is in use, its outputs' trace headers made directly (the span is
        then only those ids)."""
        headers = None if recording or not w3c else child_trace_headers(record.headers)
        if headers is not None:
            return INVALID_SPAN, headers
        return self._process_span(record, recording, w3c), None

    def _process_span(
        self, record: ConsumerRecord[bytes, bytes], recording: bool, w3c: bool
    ) -> Span:
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

    @staticmethod
    def output_headers(job: Job) -> Headers:
        """The trace headers of ``job``'s outputs: its process span's context."""
        if job.headers is None:
            job.headers = (
                traceparent_headers(job.span.get_span_context())
                if job.w3c
                else headers_from_context(trace.set_span_in_context(job.span, Context()))
            )
        return job.headers

    def batch_span(self, jobs: list[Job]) -> Span | None:
        """A ``batch {stage}`` span linking ``jobs``, for a batch of several records."""
        if len(jobs) < 2:
            return None
        return self._tracer.start_span(
            f"batch {self.stage_name}",
            links=[
                Link(j.span.get_span_context()) for j in jobs if j.span.get_span_context().is_valid
            ],
            attributes={"genseg.batch.size": len(jobs)},
        )

    def replay_phases(self, ctx: StageContext, jobs: list[Job]) -> None:
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
