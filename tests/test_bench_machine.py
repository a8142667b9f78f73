"""bench/machine.py's speed probe: what a bench table states about how fast the machine ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.machine import speed_probe

ROOT = Path(__file__).resolve().parents[1]


def test_the_probe_measures_three_positive_speeds() -> None:
    probe = speed_probe(repeats=1)
    assert set(probe) == {"python_loop_ms", "syscall_us", "thread_handoff_us"}
    assert all(value > 0 for value in probe.values()), probe
    # A round trip between threads blocks and wakes twice: far more than one getppid().
    assert probe["thread_handoff_us"] > probe["syscall_us"], probe


def test_the_probe_prints_one_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.machine", "--probe"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"python_loop_ms", "syscall_us", "thread_handoff_us"}
