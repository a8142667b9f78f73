"""How a stage runtime is tuned: :class:`RuntimeConfig`, the one source of its defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RuntimeConfig:
    """Tuning of one stage runtime. Times in milliseconds unless the name says seconds.

    A stage may prefer other defaults (``Stage.runtime_defaults``, e.g. the
    generator's batch of four); explicit values win over both.
    """

    max_batch: int = 1
    max_wait_ms: int = 20
    concurrency: int = 1
    #: Records waiting for the handler or inside it; at this many fetching pauses. None:
    #: two batches a slot (``2 * max_batch * concurrency``), at least 8. Model work takes
    #: seconds a batch, so more only wait in this process: unseen by a member that joins
    #: after a rebalance, and polled for at the broker while this one has plenty.
    max_in_flight: int | None = None
    #: Records whose handler is done and whose outputs wait for the broker's acks; at
    #: this many fetching pauses too. They cost no model time, and a few round trips of
    #: a fast stage's output are hundreds of records (see docs/design-notes.md).
    max_unacked: int = 1000
    #: At either bound the fetch loop of a cheap handler (one whose calls the hand-off
    #: chains, :mod:`consumers.handoff`) first waits this long for room with its
    #: partitions fetching, and pauses them only then (:mod:`consumers.fetcher`): longer
    #: than its trips to the thread. A slower handler's loop pauses at once (unpaused
    #: partitions with nothing new cost an empty fetch each ``fetch_max_wait_ms``).
    pause_after_ms: int = 50
    max_attempts: int = 3
    backoff_initial_ms: int = 200
    backoff_max_ms: int = 10_000
    job_timeout_s: float | None = 900.0
    commit_interval_ms: int = 200
    drain_timeout_s: float = 30.0
    rebalance_drain_s: float = 10.0
    group_id: str | None = None  # default: "{prefix}.{stage.name}"
    #: Where a group with no committed offset starts: ``earliest`` (every stage: nothing
    #: is skipped), or ``latest`` (a broadcast listener with a group of its own per
    #: process, e.g. the seg worker's deletion listener).
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    instance_id: str | None = None  # static membership (group.instance.id)
    # Kafka notices a dead member after the session timeout; tansu also completes a
    # group join only after half of it, so it stays short (aiokafka's default).
    session_timeout_ms: int | None = None  # None: Settings.kafka_session_timeout_ms
    heartbeat_interval_ms: int = 1_000
    max_poll_interval_ms: int = 300_000
    fetch_max_wait_ms: int | None = None  # None: Settings.kafka_fetch_max_wait_ms
    # The output producer's batch size per partition. aiokafka sends one batch per
    # partition per request and one request per broker at a time, so under load this
    # bounds what a round trip carries (its 16 KiB default: ~50 small records).
    producer_batch_bytes: int = 128 * 1024
    create_topics: bool = True
    partitions: int = 4
    metrics_port: int | None = None
    lag_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.concurrency < 1 or self.max_attempts < 1:
            raise ValueError("max_batch, concurrency and max_attempts must be >= 1")
        if self.max_in_flight is None:
            self.max_in_flight = max(2 * self.max_batch * self.concurrency, 8)
        if self.max_in_flight < self.max_batch:
            raise ValueError("max_in_flight must be at least max_batch")
        if self.max_unacked < 1:
            raise ValueError("max_unacked must be >= 1")
        if not 0 <= self.pause_after_ms < self.max_poll_interval_ms:
            raise ValueError("pause_after_ms must be >= 0 and below max_poll_interval_ms")

    @property
    def in_flight_limit(self) -> int:
        """``max_in_flight`` once resolved (never None after construction)."""
        assert self.max_in_flight is not None
        return self.max_in_flight
