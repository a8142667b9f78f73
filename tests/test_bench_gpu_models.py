"""bench/gpu_models.py runs at tiny size on the CPU and reports what docs/benchmarks.md
reads from it (the figures themselves are the device machine's business)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENSEG_", "SD_", "OTEL_"))}
    command = [sys.executable, "bench/gpu_models.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_run_reports_every_sdxl_row() -> None:
    done = run_bench("--only", "sdxl", "--device", "cpu", "--tiny", "--repeats", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_models" and result["tiny"] is True
    assert {"cpu", "cores", "torch", "torch_threads", "python"} <= set(result["machine"])
    sdxl = result["results"]["sdxl"]
    assert sdxl["model"] == "sdxl:tiny" and sdxl["device"] == "cpu"
    assert (sdxl["size"], sdxl["steps"], sdxl["dtype"]) == (64, 2, "float32")
    rows = sdxl["rows"]
    assert sorted((r["batch"], r["heatmaps"]) for r in rows) == [
        (1, False),
        (1, True),
        (4, False),
        (4, True),
    ]
    for row in rows:
        assert len(row["runs_s"]) == 1 and row["best_s"] == min(row["runs_s"]) > 0
        assert row["s_per_image"] == round(row["best_s"] / row["batch"], 4)
        assert "peak_gpu_mem_gib" not in row  # on the CPU


def test_only_refuses_an_unknown_family() -> None:
    done = run_bench("--only", "sdxl,sam9", "--device", "cpu", "--tiny")
    assert done.returncode == 2
    assert "sam9" in done.stderr and "sdxl" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
