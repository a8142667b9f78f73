"""plumbing.telemetry without a broker: the fast W3C header helpers against the propagator,
which propagators they stand in for, and which providers record spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap, set_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanContext,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from plumbing.telemetry import (
    GensegTracerProvider,
    child_trace_headers,
    context_from_headers,
    headers_from_context,
    span_context_from_headers,
    spans_recorded,
    traceparent_headers,
    w3c_propagation,
)

# --- the fast header helpers agree with extract and inject -----------------------------

_HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=34)
_TRACEPARENTS = st.one_of(
    st.builds(
        lambda v, t, s, f, tail: f"{v}-{t}-{s}-{f}{tail}",
        st.sampled_from(["00", "01", "ff", "0", "zz"]),
        st.one_of(_HEX, st.just("0" * 32), st.just("4bf92f3577b34da6a3ce929d0e0e4736")),
        st.one_of(_HEX, st.just("0" * 16), st.just("00f067aa0ba902b7")),
        st.sampled_from(["00", "01", "ff", "1", "0g"]),
        st.sampled_from(["", "-x", " ", "\t", "\n", "-", "--a"]),
    ),
    st.text(max_size=40),
)
_HEADER_VALUES = st.one_of(
    _TRACEPARENTS.map(lambda v: v.encode("utf-8")),
    st.sampled_from([b"", b"\xff\xfe", b"vendor=value", b"a=1,b=2", b"bad state", None]),
    st.binary(max_size=20),
)


@given(
    st.lists(
        st.tuples(st.sampled_from(["traceparent", "tracestate", "baggage", "x"]), _HEADER_VALUES),
        max_size=4,
    )
)
def test_fast_trace_header_parsing_agrees_with_the_w3c_propagator(
    headers: list[tuple[str, bytes | None]],
) -> None:
    """The runtime's per-record helpers give what extract and inject give (default W3C)."""
    assert w3c_propagation()
    fast = span_context_from_headers(headers)  # type: ignore[arg-type]
    slow = trace.get_current_span(context_from_headers(headers)).get_span_context()  # type: ignore[arg-type]
    child_headers = child_trace_headers(headers)  # type: ignore[arg-type]
    if child_headers is None:  # only for a record with a tracestate: the general path
        assert any(k == "tracestate" and isinstance(v, bytes) and v.isascii() for k, v in headers)
    else:
        ((name, value),) = child_headers
        version, trace_hex, span_hex, flags = value.decode().split("-")
        assert name == "traceparent" and version == "00" and len(span_hex) == 16
        assert int(span_hex, 16) and int(trace_hex, 16)
        if slow.is_valid:
            assert (trace_hex, flags) == (f"{slow.trace_id:032x}", f"{slow.trace_flags:02x}")
            assert int(span_hex, 16) != slow.span_id or slow.span_id == 0
        else:
            assert flags == "01" and len(trace_hex) == 32
    if fast is None:
        assert not slow.is_valid
        return
    assert fast == slow
    assert fast.trace_state == slow.trace_state
    child = SpanContext(
        fast.trace_id,
        0x1234,
        is_remote=False,
        trace_flags=TraceFlags(fast.trace_flags),
        trace_state=fast.trace_state,
    )
    expected = headers_from_context(trace.set_span_in_context(NonRecordingSpan(child), Context()))
    assert traceparent_headers(child) == expected


# --- which propagators the helpers stand in for ----------------------------------------


class HeaderPropagator(TextMapPropagator):
    """A propagator of its own, carrying the trace id in headers it names: not W3C code."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        return context if context is not None else Context()

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        for name in self.names:
            setter.set(carrier, name, f"{span_context.trace_id:032x}")

    @property
    def fields(self) -> set[str]:
        return set(self.names)


class TraceContextSubclass(TraceContextTextMapPropagator):
    """A subclass may parse differently: it is not taken for the API's W3C propagator."""


@pytest.mark.parametrize(
    ("propagator", "w3c"),
    [
        (TraceContextTextMapPropagator(), True),
        (CompositePropagator([TraceContextTextMapPropagator()]), True),
        (CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]), True),
        (CompositePropagator([W3CBaggagePropagator(), TraceContextTextMapPropagator()]), True),
        # inject would write no traceparent: the fast helpers would write one
        (CompositePropagator([W3CBaggagePropagator()]), False),
        (CompositePropagator([]), False),  # OTEL_PROPAGATORS=none
        (W3CBaggagePropagator(), False),
        (HeaderPropagator("x-trace-id"), False),
        (CompositePropagator([TraceContextTextMapPropagator(), HeaderPropagator("b3")]), False),
        # W3C header names, but not the API's propagator: the general path, to be safe
        (HeaderPropagator("traceparent", "tracestate"), False),
        (TraceContextSubclass(), False),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, bool) else str(value),
)
def test_w3c_propagation_only_for_the_w3c_propagators(
    propagator: TextMapPropagator, w3c: bool
) -> None:
    assert w3c_propagation(propagator) is w3c


@pytest.fixture
def global_textmap() -> Iterator[TextMapPropagator]:
    """The global propagator, put back after the test."""
    original = get_global_textmap()
    try:
        yield original
    finally:
        set_global_textmap(original)


def test_w3c_propagation_follows_the_global_propagator(
    global_textmap: TextMapPropagator,
) -> None:
    """No cache: a propagator installed later counts from the next call on."""
    assert w3c_propagation() and w3c_propagation(None)
    set_global_textmap(HeaderPropagator("x-trace-id"))
    assert not w3c_propagation()
    set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    assert w3c_propagation()
    set_global_textmap(
        CompositePropagator([TraceContextTextMapPropagator(), HeaderPropagator("b3")])
    )
    assert not w3c_propagation()
    set_global_textmap(global_textmap)
    assert w3c_propagation()


# --- which providers record spans --------------------------------------------------------


def test_spans_recorded_only_where_a_processor_sees_them() -> None:
    provider = GensegTracerProvider()
    assert provider.span_processors == 0
    assert not spans_recorded(provider)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert provider.span_processors == 1
    assert spans_recorded(provider)
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert provider.span_processors == 2 and spans_recorded(provider)
    assert not spans_recorded(NoOpTracerProvider())
    assert not spans_recorded(ProxyTracerProvider())


def test_genseg_provider_without_processors_still_makes_trace_ids() -> None:
    """Not recording is no reason to lose the trace: spans have ids that propagate."""
    provider = GensegTracerProvider()
    with provider.get_tracer("test").start_as_current_span("work") as span:
        ids = span.get_span_context()
        headers = dict(headers_from_context())
    assert ids.is_valid
    assert headers["traceparent"].decode().split("-")[1:3] == [
        f"{ids.trace_id:032x}",
        f"{ids.span_id:016x}",
    ]


def test_an_sdk_provider_genseg_did_not_make_counts_as_recording() -> None:
    """Its processors are unknown to genseg: spans are made for them (slower, correct)."""
    assert spans_recorded(TracerProvider(shutdown_on_exit=False))


def test_a_disabled_sdk_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SDK_DISABLED=true: the SDK's tracers are no-ops, whose spans have no ids."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    foreign = TracerProvider(shutdown_on_exit=False)
    ours = GensegTracerProvider()
    for provider in (foreign, ours):
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        assert not spans_recorded(provider)


_SETUP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from opentelemetry import trace
    from plumbing.telemetry import (
        GensegTracerProvider, headers_from_context, setup_tracing, shutdown_tracing,
        spans_recorded,
    )

    os.environ.update(json.loads(sys.argv[1]))
    provider = setup_tracing("test")
    with trace.get_tracer("test").start_as_current_span("work"):
        headers = dict(headers_from_context())
    print("RESULT", json.dumps({
        "genseg": isinstance(provider, GensegTracerProvider),
        "installed": trace.get_tracer_provider() is provider,
        "recording": spans_recorded(),
        "traceparent": "traceparent" in headers,
    }))
    shutdown_tracing()
    """
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # no exporter configured: spans are ids only, and those still propagate
        ({}, {"genseg": True, "installed": True, "recording": False, "traceparent": True}),
        (
            {"OTEL_TRACES_EXPORTER": "none"},
            {"genseg": True, "installed": True, "recording": False, "traceparent": True},
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console"},
            {"genseg": True, "installed": True, "recording": True, "traceparent": True},
        ),
        (
            # nothing listens: give up exporting at exit quickly
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
            },
            {"genseg": True, "installed": True, "recording": True, "traceparent": True},
        ),
        # tracing off: the API's proxy provider stays, and nothing records
        (
            {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
            {"genseg": False, "installed": True, "recording": False, "traceparent": False},
        ),
    ],
)
def test_setup_tracing_records_only_with_an_exporter(
    env: dict[str, str], expected: dict[str, bool]
) -> None:
    """In a process of its own: the global provider can be installed only once."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", _SETUP_SCRIPT, json.dumps(env)],
        env=clean,
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert json.loads(result.removeprefix("RESULT ")) == expected
