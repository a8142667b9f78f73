"""bench/gen_paced.py runs end to end at a tiny size and reports what docs/benchmarks.md
reads from it (the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

from pathlib import Path

from tests.bench_utils import run_bench


def test_gen_paced_bench_reports_each_mode_against_the_direct_call(tmp_path: Path) -> None:
    result = run_bench(
        "gen_paced.py", "--requests", "1", "--steps", "2", "--size", "64", "--repeats", "2",
        tmp_path=tmp_path, timeout=400,
    )  # fmt: skip
    assert result["bench"] == "gen_paced" and result["fetch_max_wait_ms"] == 25
    rounds = result["rounds"]
    modes = ("direct", "worker", "polled")
    assert [k for k in rounds[0] if k in modes] == list(modes)
    assert [k for k in rounds[1] if k in modes] == list(modes[::-1]), "the modes take turns"
    for row in rounds:
        # The handler's phases are inside the client's wait for its image.
        assert 0 < row["worker"]["handler_s"] < row["worker"]["s"], row
        assert row["ratio"] == round(row["worker"]["s"] / row["direct"]["s"], 3)
        assert row["handler_ratio"] == round(row["worker"]["handler_s"] / row["direct"]["s"], 3)
        assert row["polled_ratio"] == round(row["polled"]["s"] / row["direct"]["s"], 3)
    assert result["handler_ratio"]["all"] == [r["handler_ratio"] for r in rounds]
