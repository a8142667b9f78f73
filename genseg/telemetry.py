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
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger(__name__)

TRACER_NAME = "genseg"
KafkaHeaders = Sequence[tuple[str, bytes]]


def setup_tracing(service_name: str) -> trace.TracerProvider:
    """Install and return the process's tracer provider, configured from ``OTEL_*``."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return trace.get_tracer_provider()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
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
