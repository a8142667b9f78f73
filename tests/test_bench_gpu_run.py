"""bench/gpu_run.py, the one command a lent GPU machine runs: its CPU rehearsal, its
time budget, and the end of a step that overruns (its whole process group)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_run import Step, run_step
from tests.bench_utils import ROOT, run_bench


def test_the_gen_steps_rehearse_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_bench(
        "gpu_run.py", "--cpu", "--only", "check,gen,gen_compile", "--out", str(out),
        "--no-wheels", tmp_path=tmp_path,
    )  # fmt: skip
    assert summary["bench"] == "gpu_run" and "wheels" not in summary
    steps = summary["steps"]
    assert list(steps) == ["check", "gen", "gen_compile"]
    assert all(step["rc"] == 0 and not step["timed_out"] for step in steps.values()), steps
    assert "tansu" in (out / "check.log").read_text()
    for name, compiled in (("gen", False), ("gen_compile", True)):
        result = steps[name]["result"]
        assert result["bench"] == "gpu_gen" and result["compile"] is compiled
        assert result["fused_projections"] is False  # CUDA only
        for row in result["results"]:
            runs = row["s_per_batch"]["all"]
            assert len(runs) == 2
            assert row["s_per_batch"]["median"] == pytest.approx(sum(runs) / 2, abs=2e-4)
            assert row["s_per_image"] == round(row["s_per_batch"]["median"] / row["batch"], 4)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_step_the_budget_cannot_hold_is_skipped(tmp_path: Path) -> None:
    summary = run_bench(
        "gpu_run.py", "--cpu", "--only", "pipeline", "--budget-s", "30",
        "--out", str(tmp_path / "out"), "--no-wheels", tmp_path=tmp_path,
    )  # fmt: skip
    assert list(summary["steps"]) == ["pipeline"]
    assert summary["steps"]["pipeline"]["skipped"].endswith("needs 60")


def test_no_wheels_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "whl"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "bench/gpu_run.py", "--wheels", str(empty), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "no wheels in" in done.stderr


def test_an_overrunning_step_ends_with_its_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # The step starts a child that outlives it unless the whole group is ended.
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    step = Step("slow", ["bash", "-c", script], min_s=0, cap_s=60)
    started = time.monotonic()
    result = run_step(step, 2.0, dict(os.environ), tmp_path / "slow.log")
    assert result["timed_out"] and result["rc"] != 0 and result["result"] is None
    assert time.monotonic() - started < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)  # polls for the kernel to finish the kill, bounded
    assert not alive(child)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
