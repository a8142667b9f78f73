"""bench/machine.py's speed probe: what a bench table states about how fast the machine ran."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.machine import VECTOR_FLAGS, LoadMeter, describe, speed_probe

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


def _burn_thread_cpu(seconds: float, work: Callable[[], object]) -> None:
    """Spend ``seconds`` of this thread's CPU calling ``work()``."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        work()


def test_load_meter_reports_the_entering_threads_cpu_apart_from_the_process() -> None:
    """The block's thread (an async bench's event loop) burns 0.15 CPU-s, another thread
    0.3 (hashing, GIL released): the meter gives the first alone as ``thread_cpu_s``."""
    chunk = os.urandom(64 * 1024)
    other = threading.Thread(
        target=_burn_thread_cpu, args=(0.3, lambda: hashlib.sha256(chunk).digest())
    )
    with LoadMeter({"bench": [os.getpid()]}) as meter:
        other.start()
        _burn_thread_cpu(0.15, lambda: sum(range(50)))
        other.join()
    assert 0.15 <= meter.thread_cpu_s < 0.25, meter.thread_cpu_s
    assert meter.by_role["bench"] >= meter.thread_cpu_s + 0.25, meter.by_role
    assert meter.report()["thread_cpu_s"] == round(meter.thread_cpu_s, 3)
