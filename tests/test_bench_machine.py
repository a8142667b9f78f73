"""bench/machine.py's speed probe: what a bench table states about how fast the machine ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.machine import VECTOR_FLAGS, describe, speed_probe

ROOT = Path(__file__).resolve().parents[1]


PROBES = {"python_loop_ms", "syscall_us", "thread_handoff_us", "matmul_fp32_ms", "matmul_bf16_ms"}


def test_the_probe_measures_positive_speeds() -> None:
    probe = speed_probe(repeats=1)
    assert set(probe) == PROBES
    assert all(value > 0 for value in probe.values()), probe
    # A round trip between threads blocks and wakes twice: far more than one getppid().
    assert probe["thread_handoff_us"] > probe["syscall_us"], probe


def test_the_probe_prints_one_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.machine", "--probe"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == PROBES
    assert set(speed_probe(repeats=1, with_torch=False)) == PROBES - {
        "matmul_fp32_ms",
        "matmul_bf16_ms",
    }


def test_the_machine_names_its_cpu_generation() -> None:
    info = describe(with_torch=False)
    if Path("/proc/cpuinfo").exists():
        assert info["cpu_family"].isdigit() and info["model"].isdigit(), info
        assert set(info["vector"]) <= set(VECTOR_FLAGS), info
