"""A real OTLP/HTTP trace receiver on loopback, for tests that export spans from other processes.

Worker processes export with the SDK's OTLP/HTTP exporter (``OTEL_EXPORTER_OTLP_ENDPOINT``)
to ``POST /v1/traces``; the body is a protobuf ``ExportTraceServiceRequest`` (optionally
gzip or deflate compressed). Every span is decoded and kept::

    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        ...
        receiver.wait_for(lambda spans: any(s.name == "decode" for s in spans), timeout=60)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

#: Largest request body accepted (the SDK's batches are far smaller).
MAX_BODY = 64 * 2**20


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received; ids are lower-case hex (``parent_span_id`` is ``""`` for roots)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service_name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    links: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id) of each link


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest`` body."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        service_name=service,
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links),
                    )
                )
    return spans


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/v1/traces":
            self._reply(HTTPStatus.NOT_FOUND, b"only /v1/traces", "text/plain")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"too large", "text/plain")
            return
        body = self.rfile.read(length)
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != "application/x-protobuf":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, b"protobuf only", "text/plain")
            return
        try:
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            spans = decode_spans(body)
        except Exception as exc:  # a malformed export is the exporter's bug: say so
            self.server.receiver.errors.append(f"{type(exc).__name__}: {exc}")
            self._reply(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain")
            return
        self.server.receiver._add(spans)
        self._reply(HTTPStatus.OK, ExportTraceServiceResponse().SerializeToString(), content_type)

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: OtlpReceiver, host: str) -> None:
        self.receiver = receiver
        super().__init__((host, 0), _Handler)


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on a free loopback port that keeps every span it gets."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        #: Bodies that failed to decode (a test may assert there were none).
        self.errors: list[str] = []
        #: Export requests received.
        self.requests = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("receiver not started")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter adds ``/v1/traces``)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server = _Server(self, self.host)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self.requests += 1
            self._spans.extend(spans)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A snapshot of every span received so far."""
        with self._changed:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans received so far of one trace (hex id)."""
        return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(
        self,
        condition: Callable[[list[ReceivedSpan]], bool],
        timeout: float = 60.0,
        what: str = "",
    ) -> list[ReceivedSpan]:
        """Block until ``condition(spans)`` holds (checked on every export); return the spans.

        Raises :class:`AssertionError` after ``timeout`` seconds, naming what was received.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                spans = list(self._spans)
                if condition(spans):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({(s.service_name, s.name) for s in spans})
                    raise AssertionError(
                        f"spans not received within {timeout}s: {what or condition}; "
                        f"{len(spans)} spans in {self.requests} exports, names {names[:40]}, "
                        f"decode errors {self.errors[:3]}"
                    )
                # Woken by every export; the timeout also re-checks conditions on time.
                self._changed.wait(min(remaining, 0.5))
