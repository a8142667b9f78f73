"""Reliability: a soak of 1,000 tiny requests through one gen and one seg worker process.

After a warm-up, neither process's resident memory (VmRSS) grows by 10% or more, and
neither holds more open file descriptors at the end than after the warm-up. Every
request ends with exactly one asset-ready event.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from tests.rel_utils import Ledger, WorkerProcess, record_figures, stop_all, worker_env
from tests.test_rel_workers import publish, tiny_prompt

SOAK_REQUESTS = 1000
WARM_UP = 150
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 0  # open descriptors must not grow at all


@pytest.mark.slow
async def test_soak_of_1000_requests_keeps_memory_and_descriptors_flat(
    settings: Settings, tmp_path: Path
) -> None:
    await ensure_topics(settings, partitions=4)
    env = worker_env(settings)
    gen = WorkerProcess("gen", env, tmp_path)
    seg = WorkerProcess("seg", env, tmp_path)
    ids = [f"soak-{i:04d}" for i in range(SOAK_REQUESTS)]
    events = [tiny_prompt(i, n, 1 + n % 2) for n, i in enumerate(ids)]
    samples: list[dict[str, float]] = []

    def sample(label: str) -> dict[str, float]:
        row: dict[str, float] = {"t": round(time.monotonic() - started, 1)}
        for worker in (gen, seg):
            worker.check_alive()
            row[f"{worker.name}_rss_mib"] = round(worker.rss_kib() / 1024, 1)
            row[f"{worker.name}_fds"] = worker.open_fds()
            row[f"{worker.name}_threads"] = worker.threads()
        row["done"] = len(ledger.terminal_ids() & set(ids))
        samples.append({**row, "label": label})  # type: ignore[dict-item]
        return row

    started = time.monotonic()
    try:
        gen.start()
        seg.start()
        await asyncio.gather(gen.wait_assigned(), seg.wait_assigned())
        async with Ledger(settings) as ledger:
            await publish(settings, events[:WARM_UP])
            await ledger.until_done(ids[:WARM_UP], timeout=180)
            warm = sample("after warm-up")
            await publish(settings, events[WARM_UP:])
            deadline = time.monotonic() + 420
            next_sample = time.monotonic() + 5
            while not ledger.done(ids):
                assert time.monotonic() < deadline, f"soak not done: {samples[-1]}"
                await ledger.poll(200)
                if time.monotonic() >= next_sample:
                    sample("during")
                    next_sample = time.monotonic() + 5
            end = sample("end")
            verdict = ledger.verdict(ids)
    finally:
        stop_all([gen, seg])
    elapsed = time.monotonic() - started
    growth = {
        w: (end[f"{w}_rss_mib"] - warm[f"{w}_rss_mib"]) / warm[f"{w}_rss_mib"]
        for w in ("gen", "seg")
    }
    record_figures(
        "soak",
        seconds=round(elapsed, 1),
        warm_up_requests=WARM_UP,
        rss_growth_percent={w: round(100 * g, 2) for w, g in growth.items()},
        peak_rss_mib={w: max(s[f"{w}_rss_mib"] for s in samples) for w in ("gen", "seg")},
        after_warm_up=warm,
        at_end=end,
        samples=len(samples),
        **verdict.figures(),
    )
    verdict.assert_exactly_once()
    assert verdict.assets == SOAK_REQUESTS
    for w in ("gen", "seg"):
        assert growth[w] < RSS_GROWTH_LIMIT, f"{w} RSS grew {growth[w]:.1%}: {samples}"
        assert end[f"{w}_fds"] <= warm[f"{w}_fds"] + FD_SLACK, f"{w} fds grew: {samples}"
