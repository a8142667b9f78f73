"""bench/gil_tax.py runs end to end at a tiny size and reports what docs/benchmarks.md
reads from it (the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.gil_tax import gil_free_burst, python_burst
from tests.bench_utils import run_bench


def test_gil_tax_bench_reports_each_mode_against_idle(tmp_path: Path) -> None:
    result = run_bench(
        "gil_tax.py", "--images", "2", "--steps", "2", "--rounds", "2",
        tmp_path=tmp_path, timeout=300,
    )  # fmt: skip
    assert result["bench"] == "gil_tax" and result["machine"]["torch_threads"] == 1
    rounds = result["rounds"]
    assert list(rounds[0]) == ["idle", "wakes", "python", "gil_free"]
    assert list(rounds[1]) == ["gil_free", "python", "wakes", "idle"], "the modes take turns"
    for row in rounds:
        assert row["idle"]["wakes"] == 0
        assert all(row[m]["wakes"] > 0 for m in ("wakes", "python", "gil_free")), row
    for mode in ("wakes", "python", "gil_free"):
        ratios = result["wall_ratio"][mode]["all"]
        assert ratios == [round(r[mode]["s"] / r["idle"]["s"], 3) for r in rounds]
        assert isinstance(result["us_per_wake"][mode], float)


def _main_thread_progress_beside(burst: Callable[[float], None], seconds: float) -> int:
    """Python loop turns this thread makes in ``seconds`` while ``burst`` runs in another."""
    worker = threading.Thread(target=burst, args=(seconds,))
    worker.start()
    turns, until = 0, time.perf_counter() + seconds
    while time.perf_counter() < until:
        turns += 1
    worker.join()
    return turns


def test_the_gil_free_burst_leaves_the_gil_to_other_threads() -> None:
    """The bench's contrast rests on this: beside a Python burst this thread gets the GIL
    about half the time; beside the hashlib burst nearly all of it (a core is free).
    Three alternating pairs, summed: this VM's speed moves by a third within a second."""
    python = gil_free = 0
    for _ in range(3):
        python += _main_thread_progress_beside(python_burst, 0.4)
        gil_free += _main_thread_progress_beside(gil_free_burst, 0.4)
    assert gil_free > 1.5 * python, (python, gil_free)
