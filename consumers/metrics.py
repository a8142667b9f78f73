"""Prometheus metrics of one stage runtime, in a registry of its own (no global state)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

#: The tenant label of records without a tenant, and of tenants past the label limit.
NO_TENANT = "-"
#: Distinct tenant labels one process reports; later tenants are counted under ``-``.
MAX_TENANT_LABELS = 100
_TENANT_LABEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: Dead-letter ``error.type`` values that are their own ``outcome``; others are ``dead_lettered``.
_REFUSAL_OUTCOMES = frozenset({"policy", "rate_limited"})


def observe_many(histogram: Any, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for each of ``values``, with one lock round per bucket
    touched instead of two per value (the runtime observes several per record). Uses
    prometheus_client's histogram fields; a histogram without them gets ``observe``."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    amount = 0.0
    for value in values:
        amount += value
        if value == value:  # NaN: in the sum, in no bucket, as observe() does
            counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe()
    total.inc(amount)
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class StageMetrics:
    """Counters, gauges and histograms named ``genseg_*``, labelled by stage."""

    def __init__(
        self,
        stage: str,
        registry: CollectorRegistry | None = None,
        *,
        max_tenant_labels: int = MAX_TENANT_LABELS,
    ) -> None:
        self.stage = stage
        self.max_tenant_labels = max_tenant_labels
        self._tenant_labels: set[str] = set()
        self._tenant_lock = threading.Lock()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "genseg_records_received", "Records consumed", ["stage"], registry=r
        ).labels(stage)
        self.processed = Counter(
            "genseg_records_processed",
            "Records whose outputs were published",
            ["stage"],
            registry=r,
        ).labels(stage)
        self.failed = Counter(
            "genseg_records_failed", "Handler attempts that failed", ["stage", "error"], registry=r
        )
        self.dead_lettered = Counter(
            "genseg_records_dead_lettered",
            "Records sent to the dead-letter topic",
            ["stage"],
            registry=r,
        ).labels(stage)
        self.retried = Counter(
            "genseg_records_retried", "Retries scheduled after a failure", ["stage"], registry=r
        ).labels(stage)
        #: The stage runtime binds it to its count (``set_function``), read when scraped.
        self.in_flight = Gauge(
            "genseg_in_flight", "Records accepted and not yet done", ["stage"], registry=r
        ).labels(stage)
        self.batch_size = Histogram(
            "genseg_batch_size",
            "Records per handler call",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        ).labels(stage)
        self.latency = Histogram(
            "genseg_stage_latency_seconds",
            "Record receipt to outputs acknowledged",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(stage)
        self.handler_seconds = Histogram(
            "genseg_handler_seconds",
            "Handler call duration per batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(stage)
        self.commits = Counter(
            "genseg_offset_commits", "Offset commits sent to the broker", ["stage"], registry=r
        ).labels(stage)
        self.lag = Gauge(
            "genseg_consumer_lag",
            "High watermark minus committed offset",
            ["stage", "topic", "partition"],
            registry=r,
        )
        self.tenant_records = Counter(
            "genseg_tenant_records",
            "Records finished per tenant: outcome processed, policy, rate_limited or "
            "dead_lettered (any other dead letter)",
            ["stage", "tenant", "outcome"],
            registry=r,
        )
        self._server: Any = None

    def tenant_label(self, tenant: str | None) -> str:
        """The ``tenant`` label for ``tenant``: bounded, so one process exports at most
        ``max_tenant_labels`` tenants (the first seen); the rest and no tenant are ``-``."""
        if not tenant or not _TENANT_LABEL.match(tenant):
            return NO_TENANT
        with self._tenant_lock:
            if tenant in self._tenant_labels:
                return tenant
            if len(self._tenant_labels) < self.max_tenant_labels:
                self._tenant_labels.add(tenant)
                return tenant
        return NO_TENANT

    def tenant_outcome(self, tenant: str | None, outcome: str, count: int = 1) -> None:
        """Count ``count`` finished records of ``tenant``: ``processed`` or a dead letter's
        ``error.type`` (``policy`` and ``rate_limited`` kept, others ``dead_lettered``)."""
        if outcome != "processed" and outcome not in _REFUSAL_OUTCOMES:
            outcome = "dead_lettered"
        self.tenant_records.labels(self.stage, self.tenant_label(tenant), outcome).inc(count)

    def fail(self, error_type: str) -> None:
        self.failed.labels(self.stage, error_type).inc()

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag.labels(self.stage, topic, str(partition)).set(max(lag, 0))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the lag series of a partition this member no longer owns.

        Call on revoke: a stale series would go on reporting the lag it had when the
        partition moved, and a sum over members (the autoscaler's query) would count
        that partition twice.
        """
        with contextlib.suppress(KeyError):
            self.lag.remove(self.stage, topic, str(partition))

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` over HTTP on ``port`` (in a daemon thread)."""
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
