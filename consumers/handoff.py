"""Handing batches to the handler's thread, and back: the runtime's thread hand-off.

Model work runs in a thread pool, off the event loop, so heartbeats go on. Each trip
to a worker thread costs tens of microseconds (the executor, the future, the loop's
wake-up): nothing next to a model call, most of the cost of a trivial handler. So
the hand-off follows the handler's pace:

- a handler whose calls take well under :data:`CHAIN_BUDGET_S` (recent calls, mean)
  gets several ready batches per trip, as many as fit that budget (at most
  :data:`CHAIN_MAX_BATCHES`), and the fetch bound grows to two such trips, like
  ``max_in_flight``'s two batches a slot;
- while it chains, a full fetch bound waits ``pause_after_ms`` for room before it
  pauses the partitions (:mod:`consumers.fetcher`); otherwise it pauses at once;
- a slow trip (model work) restores one batch a trip and ``max_in_flight`` at once;
  chaining comes back only after many fast trips;
- only with one worker (with several, a batch must stay free for whichever is free
  first) and never for a sequential stage (its records go one by one).

A call that runs past ``job_timeout_s`` fails every batch of its trip (retried alone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from consumers.batching import Job
from consumers.config import RuntimeConfig
from consumers.failures import JobTimeout
from consumers.fetcher import InFlight
from consumers.metrics import StageMetrics, observe_many
from consumers.stage import ItemResult, Stage, StageContext
from consumers.tombstones import handle_checked
from consumers.tracing import RecordTracing

log = logging.getLogger(__name__)

#: A cheap handler's trip carries as many batches as its recent calls say fit this many
#: seconds; a batch's outputs then wait at most about this long for its trip mates.
CHAIN_BUDGET_S = 0.002
#: At most this many batches in one trip.
CHAIN_MAX_BATCHES = 256

#: What one handler call came to in the thread: its results or what it raised, seconds.
Outcome = tuple[list[ItemResult] | BaseException, float]


class Handoff:
    """Runs a stage's handler on batches in ``executor`` (see the module docstring)."""

    def __init__(
        self,
        stage: Stage[Any],
        config: RuntimeConfig,
        executor: Executor,
        tracing: RecordTracing,
        metrics: StageMetrics,
        in_flight: InFlight,
        make_context: Callable[[list[Job]], StageContext],
    ) -> None:
        self.stage = stage
        self.config = config
        self.executor = executor
        self.tracing = tracing
        self.metrics = metrics
        self.in_flight = in_flight
        self.make_context = make_context
        #: Seconds a handler call takes lately; unknown at first.
        self.pace_s = float("inf")
        #: Batches a trip may carry now.
        self.chain = 1
        self._may_chain = config.concurrency == 1 and not stage.sequential

    def room(self) -> int:
        """How many more ready batches the next trip may take along."""
        return self.chain - 1

    def follow_pace(self, seconds: list[float]) -> None:
        """Follow the mean seconds of a call in a trip: up at once, down slowly; size the
        chains and the fetch bound to it."""
        mean = sum(seconds) / len(seconds)
        pace = self.pace_s
        pace = mean if mean >= pace or pace == float("inf") else pace + (mean - pace) * 0.1
        self.pace_s = pace
        chain = 1
        if self._may_chain and 2 * pace <= CHAIN_BUDGET_S:
            chain = min(int(CHAIN_BUDGET_S / max(pace, 1e-6)), CHAIN_MAX_BATCHES)
        # Room comes back within a trip of milliseconds: wait for it fetching. A model's
        # batch takes seconds: pause at once (no empty fetches meanwhile).
        self.in_flight.pause_after_s = self.config.pause_after_ms / 1000 if chain > 1 else 0.0
        if chain != self.chain:
            self.chain = chain
            stretched = 2 * chain * self.config.max_batch if chain > 1 else 0
            self.in_flight.set_limit(max(self.config.in_flight_limit, stretched))

    def _call(self, calls: list[tuple[list[Any], StageContext]]) -> list[Outcome]:
        """In the worker thread: the handler on each batch in turn."""
        out: list[Outcome] = []
        stage, clock = self.stage, time.perf_counter
        for events, ctx in calls:
            started = clock()
            try:
                # The handler, then the check that no output of a deleted request goes out.
                results = handle_checked(stage, events, ctx)
                if not isinstance(results, list):  # a handler may return any sequence
                    results = list(results)
                out.append((results, clock() - started))
            except Exception as exc:
                out.append((exc, clock() - started))
        return out

    async def run(self, batches: list[list[Job]]) -> list[ItemResult]:
        """The handler on each of ``batches``, in one trip; one result per job, in order."""
        recording = self.tracing.recording()
        spans = [self.tracing.batch_span(jobs) for jobs in batches] if recording else []
        calls: list[tuple[list[Any], StageContext]] = []
        for jobs in batches:  # one pass: a trip may carry hundreds of one-record batches
            events = []
            for job in jobs:
                job.attempts += 1
                events.append(job.event)
            calls.append((events, self.make_context(jobs)))
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            call = loop.run_in_executor(self.executor, self._call, calls)
            outcomes = await asyncio.wait_for(call, self.config.job_timeout_s)
        except TimeoutError:
            timeout = JobTimeout(f"handler ran past {self.config.job_timeout_s}s")
            elapsed = (time.monotonic() - started) / len(batches)
            outcomes = [(timeout, elapsed)] * len(batches)
        finally:
            for span in spans:
                if span is not None:
                    span.end()
        seconds = [s for _, s in outcomes]
        self.follow_pace(seconds)
        observe_many(self.metrics.batch_size, [len(jobs) for jobs in batches])
        observe_many(self.metrics.handler_seconds, seconds)
        results: list[ItemResult] = []
        for jobs, (_, ctx), (outcome, _) in zip(batches, calls, outcomes, strict=True):
            results += self._per_job(jobs, outcome)
            if recording and ctx.phases:
                self.tracing.replay_phases(ctx, jobs)
        return results

    def _per_job(
        self, jobs: list[Job], outcome: list[ItemResult] | BaseException
    ) -> list[ItemResult]:
        if isinstance(outcome, list) and len(outcome) != len(jobs):
            outcome = RuntimeError(
                f"handler returned {len(outcome)} results for {len(jobs)} events"
            )
        if isinstance(outcome, list):
            return outcome
        if not isinstance(outcome, JobTimeout):
            log.warning(
                "stage %s handler raised for a batch of %d: %r", self.stage.name, len(jobs), outcome
            )
        return [outcome] * len(jobs)
