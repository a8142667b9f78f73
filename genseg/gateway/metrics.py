"""Prometheus metrics of one gateway, in a registry of its own (two gateways in one
process, as in the tests, do not share counters)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GatewayMetrics:
    """``genseg_gateway_*``: HTTP requests by route and status, latency, publishes,
    open event streams, records read into the view."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "genseg_gateway_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "genseg_gateway_http_request_seconds",
            "Time to the response's first byte",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published = Counter(
            "genseg_gateway_requests_published", "Requests published to the prompts topic",
            registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "genseg_gateway_requests_refused",
            "Submissions refused before publishing",
            ["reason"],
            registry=r,
        )
        self.streams = Gauge(
            "genseg_gateway_event_streams", "Open Server-Sent Events streams", registry=r
        )
        self.view_records = Counter(
            "genseg_gateway_view_records",
            "Records read from the topics into the view by this process",
            ["topic"],
            registry=r,
        )


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not its path: ids
    and blob keys would make the label unbounded)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.http_seconds.labels(scope["method"], _route(scope)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.http_requests.labels(
                scope["method"], _route(scope), str(status["code"])
            ).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
