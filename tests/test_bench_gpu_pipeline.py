"""bench/gpu_pipeline.py runs end to end on the CPU with tiny models and reports what
docs/benchmarks.md reads from it (the figures are the benchmark's business, and a GPU's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_utils import run_bench


def test_gpu_pipeline_bench_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    result = run_bench(
        "gpu_pipeline.py", "--device", "cpu", "--tiny",
        "--latency-requests", "2", "--saturation-requests", "4", "--warmup", "1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result["bench"] == "gpu_pipeline" and result["device"] == "cpu"
    assert (result["size"], result["steps"], result["sam_dtype"]) == (64, 4, "fp32")
    assert result["models"]["gen"] == "tiny" and result["gen_max_batch"] == 4

    latency = result["latency"]
    for side in ("direct", "pipeline"):
        assert len(latency[side]["all_s"]) == 2
        assert 0 < latency[side]["p50_s"] <= latency[side]["p95_s"]
        assert "other_load_cores" in latency[side]
        if not result["gpu_sampler"]:
            assert latency[side]["gpu_busy_share"] is None
    timings = latency["pipeline_timings_ms"]
    assert {"gen.denoise", "seg.predict"} <= set(timings), timings

    saturation = result["saturation"]
    assert saturation["requests"] == 4
    direct, pipeline = saturation["direct"], saturation["pipeline"]
    assert direct["req_per_s"] == pytest.approx(4 / direct["s"], rel=0.01)
    ratio = saturation["throughput_ratio"]
    assert ratio == pytest.approx(direct["s"] / pipeline["s"], rel=0.01) and ratio > 0
