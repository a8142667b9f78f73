"""bench/gil_tax.py runs end to end at a tiny size and reports what docs/benchmarks.md
reads from it (the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

from pathlib import Path

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
