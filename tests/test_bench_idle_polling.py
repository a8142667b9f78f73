"""bench/idle_polling.py runs end to end at a tiny size and reports what docs/benchmarks.md
reads from it (the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

from pathlib import Path

from tests.bench_utils import run_bench


def test_idle_polling_bench_reports_each_wait(tmp_path: Path) -> None:
    result = run_bench(
        "idle_polling.py", "--waits", "10,50", "--sends", "2", "--idle-s", "0.3",
        "--images", "4", "--steps", "2", "--rounds", "2", tmp_path=tmp_path, timeout=300,
    )  # fmt: skip
    assert result["bench"] == "idle_polling" and result["waits_ms"] == [10, 50]
    for wait in ("10", "50"):
        hop = result["hop_ms"][wait]
        assert 0 < hop["p50"] <= hop["max"] < 2000, "each record was read, within the poll"
        assert set(result["idle_cores"][wait]) == {"client", "broker", "other_load_cores"}
    rounds = result["rounds"]
    assert list(rounds[0]) == ["alone", "wait_10", "wait_50"]
    assert list(rounds[1]) == ["wait_50", "wait_10", "alone"], "the modes take turns"
    for key in ("wait_10", "wait_50"):
        ratios = result["beside_generator"][key]["wall_ratio"]["all"]
        assert ratios == [round(r[key]["s"] / r["alone"]["s"], 3) for r in rounds]
