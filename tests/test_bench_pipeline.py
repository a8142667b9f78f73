"""bench/pipeline.py runs end to end on a few requests and reports what docs/benchmarks.md
reads from it (the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

from pathlib import Path

from tests.bench_utils import run_bench


def test_pipeline_bench_reports_every_part(tmp_path: Path) -> None:
    result = run_bench(
        "pipeline.py", "--requests", "2", "--steps", "2",
        "--repeats", "2", "--scale-requests", "4", "--scale-repeats", "2",
        "--flow-requests", "1", "--flow-size", "64", "--flow-repeats", "1", tmp_path=tmp_path,
        session_timeout_ms=None,  # (b) freezes a group for 4 s at a time: 10 s, as it runs
    )  # fmt: skip
    assert result["bench"] == "pipeline"

    overhead = result["overhead"]
    assert overhead["requests"] == 2 and overhead["gen_max_batch"] == 4
    objects = overhead["objects_per_run"]
    assert objects["pipeline"] == objects["direct"], "the same seeds cut out the same objects"
    assert overhead["pipeline_s_per_request"] > 0 and overhead["direct_s_per_request"] > 0
    rounds = overhead["rounds"]
    assert len(rounds) == 2 and list(rounds[0])[1:3] == ["direct", "pipeline"]
    assert list(rounds[1])[1:3] == ["pipeline", "direct"], "the modes take turns"
    for r in rounds:
        assert r["wall_ratio"] == round(r["pipeline"]["s"] / r["direct"]["s"], 3)
        assert "other_load_cores" in r["direct"] and r["pipeline"]["ours_cpu_s"] > 0
    assert overhead["ratio_spread"]["min"] <= overhead["ratio"] <= overhead["ratio_spread"]["max"]
    assert overhead["cpu_ratio"] > 0

    scale = result["scale"]
    assert scale["requests"] == 4 and scale["worker_max_in_flight"] == "default"
    rounds = scale["load"]
    assert sorted(r["processes"] for r in rounds) == [1, 1, 2, 2]
    for r in rounds:
        assert len(r["batches"]) == r["processes"] == len(r["finished_s"])
        assert sum(r["records"]) == 4, "every request of the round went through this group"
        idle = r["cpu_s_by_role"][f"gen_group_{3 - r['processes']}"]
        assert idle <= 0.03, f"the other group was frozen during the round: {idle} CPU-s"
        assert r["s"] >= max(r["finished_s"]) - 1e-3
    assert scale["throughput_ratio"] > 0

    flow = result["flow"]
    assert flow["requests"] == 1 and flow["size"] == 64
    [row] = flow["rounds"]
    assert row["loop"]["objects"] == row["pipeline"]["objects"]
    assert row["loop"]["gen_s"] > 0 and row["ceiling"] >= 1.0
    assert flow["throughput_ratio"] == row["ratio"] > 0
