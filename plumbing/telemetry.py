"""OpenTelemetry set-up from the standard ``OTEL_*`` variables, and Kafka header propagation.

Exporter choice (``OTEL_TRACES_EXPORTER``, a comma-separated list, default ``otlp``):
OTLP over HTTP (protobuf) when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; the console for ``console``;
otherwise spans are still created (trace ids exist and propagate) but nothing is
exported. ``OTEL_SDK_DISABLED=true`` turns tracing off entirely.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, get_global_textmap, inject
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracer,
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanContext,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACER_NAME = "genseg"
KafkaHeaders = Sequence[tuple[str, bytes]]


class GensegTracerProvider(TracerProvider):
    """The SDK provider that :func:`setup_tracing` installs. It counts the span processors
    added to it, so :func:`spans_recorded` knows from public API whether its spans reach
    anything (none added: an unexported span is only ids, made far more cheaply)."""

    def __init__(self, resource: Resource | None = None, sampler: Sampler | None = None) -> None:
        super().__init__(sampler=sampler, resource=resource)
        self._processors = 0
        self._count_lock = threading.Lock()
        # OTEL_SDK_DISABLED=true, read by the SDK when built: its tracers are then no-ops.
        self._enabled = not isinstance(self.get_tracer(TRACER_NAME), NoOpTracer)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        """Register ``span_processor`` (see the SDK), and count it."""
        super().add_span_processor(span_processor)
        with self._count_lock:
            self._processors += 1

    @property
    def span_processors(self) -> int:
        """How many span processors were added."""
        return self._processors

    @property
    def recording(self) -> bool:
        """Whether a span started now reaches a span processor."""
        return self._enabled and self._processors > 0


def setup_tracing(service_name: str) -> trace.TracerProvider:
    """Install and return the process's tracer provider, configured from ``OTEL_*``."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return trace.get_tracer_provider()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = GensegTracerProvider(resource=resource)
    # A comma-separated list by the specification ("otlp,console"; "none" for none).
    exporters = {
        name.strip()
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")
        if name.strip()
    }
    has_endpoint = any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if "console" in exporters:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if "otlp" in exporters and has_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        )
        if protocol and protocol != "http/protobuf":
            log.warning(
                "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported: exporting OTLP/HTTP protobuf "
                "(point the endpoint at the collector's HTTP port, usually 4318)",
                protocol,
            )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP/HTTP")
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing() -> None:
    """Flush and stop the installed provider's exporters (call on process exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def headers_from_context(context: Context | None = None) -> list[tuple[str, bytes]]:
    """W3C ``traceparent``/``tracestate`` Kafka headers for ``context`` (or the current one)."""
    carrier: dict[str, str] = {}
    inject(carrier, context=context)
    return [(key, value.encode("ascii")) for key, value in carrier.items()]


def origin_context(context: Context | None = None) -> Context:
    """``context`` if it holds a valid span, else a fresh sampled trace to start one.

    Without an OpenTelemetry SDK the API's spans are invalid and inject nothing,
    yet the contract puts a ``traceparent`` on every record: the first publisher
    of a request then originates the trace, and no-op tracers downstream pass it on.
    """
    span = trace.get_current_span(context)
    if span.get_span_context().is_valid:
        return context if context is not None else otel_context.get_current()
    fresh = SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(fresh), context)


def context_from_headers(headers: KafkaHeaders | None) -> Context:
    """The upstream trace context carried by a record's headers (empty if none or invalid)."""
    carrier: dict[str, str] = {}
    for key, value in headers or ():
        if key in ("traceparent", "tracestate", "baggage") and isinstance(value, bytes):
            try:
                carrier[key] = value.decode("ascii")
            except UnicodeDecodeError:
                continue
    return extract(carrier)


# --- the record path's fast helpers ------------------------------------------------------
#
# A stage runtime handles thousands of records a second, each with its own trace context.
# The helpers below give the same results as ``extract``/``inject`` with the default W3C
# propagator, and as an SDK span that nothing would ever see, at a fraction of the cost.

#: The W3C ``traceparent`` grammar, as the API's TraceContextTextMapPropagator parses it.
_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_TRACEPARENT_MAX = 512
_TRACESTATE_MAX = 8192
#: The headers of W3C trace context and baggage: all a propagator may touch for the helpers
#: below to stand in for it. Baggage may be among them as the runtime never carries it on:
#: its outputs' context is a span's alone, so the default ``inject`` writes none either.
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})


def w3c_propagation(propagator: TextMapPropagator | None = None) -> bool:
    """True when ``propagator`` (None: the global one) is W3C trace context, with or without
    baggage, the default: then :func:`span_context_from_headers` and
    :func:`traceparent_headers` stand in for ``extract`` and ``inject``.

    Judged by public API only: the API's own ``TraceContextTextMapPropagator``, or the
    API's ``CompositePropagator`` whose ``fields`` include ``traceparent`` and nothing but
    W3C headers (``OTEL_PROPAGATORS=tracecontext[,baggage]``, the default). Exact types, as
    a subclass may parse differently. A composite's members are known only by their
    fields, so a member that declares W3C headers alone counts as W3C: the header names
    have one meaning. Anything else (B3, Jaeger, a custom propagator, ``none``) takes the
    general ``extract``/``inject`` path: slower, never wrong.

    Not cached (called once per fetch, and per output of a record with a span): about
    0.5 µs with the default composite, 0.07 µs with a bare trace-context propagator (timeit).
    """
    if propagator is None:
        propagator = get_global_textmap()
    kind = type(propagator)
    if kind is TraceContextTextMapPropagator:
        return True
    if kind is not CompositePropagator:
        return False
    fields = propagator.fields
    return "traceparent" in fields and fields <= _W3C_FIELDS


def _w3c_values(headers: KafkaHeaders | None) -> tuple[str | None, str | None]:
    """``traceparent`` and ``tracestate`` as context_from_headers reads them: the last
    ASCII value of each wins."""
    traceparent: str | None = None
    tracestate: str | None = None
    for key, value in headers or ():
        if key in ("traceparent", "tracestate") and isinstance(value, bytes):
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                continue
            if key == "traceparent":
                traceparent = text
            else:
                tracestate = text
    return traceparent, tracestate


def _traceparent_ids(traceparent: str | None) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) in lowercase hex of a valid ``traceparent``, else None."""
    if not traceparent or len(traceparent) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_hex == "0" * 32 or span_hex == "0" * 16:
        return None
    return trace_hex, span_hex, flags


def span_context_from_headers(headers: KafkaHeaders | None) -> SpanContext | None:
    """The upstream span context of a record's W3C ``traceparent``/``tracestate`` headers,
    or None; what the W3C propagator's ``extract`` finds, without building a Context."""
    traceparent, tracestate = _w3c_values(headers)
    ids = _traceparent_ids(traceparent)
    if ids is None:
        return None
    trace_hex, span_hex, flags = ids
    state = None
    if tracestate is not None and len(tracestate) <= _TRACESTATE_MAX:
        state = TraceState.from_header([tracestate])
    return SpanContext(
        trace_id=int(trace_hex, 16),
        span_id=int(span_hex, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=state,
    )


def child_trace_headers(headers: KafkaHeaders | None) -> list[tuple[str, bytes]] | None:
    """The W3C headers of a new span under a record's ``traceparent`` (or of the root of a
    fresh sampled trace, without a valid one): what ``traceparent_headers`` gives for
    ``child_span_context(span_context_from_headers(headers))``, made straight from the
    header text. None for a record with a ``tracestate`` (take that longer way then)."""
    traceparent, tracestate = _w3c_values(headers)
    if tracestate is not None:
        return None
    ids = _traceparent_ids(traceparent)
    span = b"%016x" % (random.getrandbits(64) or 1)
    if ids is None:
        value = b"00-%032x-%s-01" % (random.getrandbits(128) or 1, span)
    else:
        value = b"00-%s-%s-%s" % (ids[0].encode(), span, ids[2].encode())
    return [("traceparent", value)]


def traceparent_headers(span_context: SpanContext) -> list[tuple[str, bytes]]:
    """The Kafka headers that the W3C propagator's ``inject`` writes for ``span_context``."""
    if not span_context.is_valid:
        return []
    headers = [
        (
            "traceparent",
            b"00-%032x-%016x-%02x"
            % (span_context.trace_id, span_context.span_id, span_context.trace_flags),
        )
    ]
    if span_context.trace_state:
        headers.append(("tracestate", span_context.trace_state.to_header().encode("ascii")))
    return headers


def child_span_context(parent: SpanContext | None) -> SpanContext:
    """A new span's context: a fresh span id in ``parent``'s trace (its flags and state
    kept), or the root of a fresh sampled trace without one. What an unexported span
    needs: the ids that propagate downstream, and nothing to record."""
    if parent is None or not parent.is_valid:
        return SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    return SpanContext(
        trace_id=parent.trace_id,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=parent.trace_flags,
        trace_state=parent.trace_state,
    )


def spans_recorded(provider: trace.TracerProvider | None = None) -> bool:
    """Whether a span started from ``provider`` (None: the global one) reaches anything.

    False for the API's no-op and proxy providers, for a disabled SDK and for a
    :class:`GensegTracerProvider` without span processors (``setup_tracing`` without an
    exporter): spans from those are never seen, so the caller may make
    :func:`child_span_context` ids instead. Checked per use (once per fetch), as
    processors may be added later. Any other provider counts as recording: its spans are
    made and offered to whatever it holds (correct, only slower).
    """
    if provider is None:
        provider = trace.get_tracer_provider()
    if isinstance(provider, GensegTracerProvider):
        return provider.recording
    if isinstance(provider, NoOpTracerProvider | ProxyTracerProvider):
        return False
    if isinstance(provider, TracerProvider):
        # A disabled SDK (OTEL_SDK_DISABLED) hands out the API's no-op tracer, whose spans
        # carry no ids: only the fast path gives the records their traceparent then.
        # About 6 µs, once per fetch, and only for an SDK provider that genseg did not make.
        return not isinstance(provider.get_tracer(TRACER_NAME), NoOpTracer)
    return True
