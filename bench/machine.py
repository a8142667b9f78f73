"""What the bench scripts say about the machine they ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


#: The vector extensions that decide how fast torch runs on a CPU, as /proc/cpuinfo names
#: them: a VM's "AMD EPYC" can be a Zen 3 without AVX-512 one day and a Zen 4 with it (and
#: native bf16) the next, at very different speeds (docs/benchmarks.md, "The slow day was
#: another CPU").
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); empty where unreadable."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux); None where it cannot be read."""
    return _cpuinfo().get("model name")


def cpu_generation() -> dict[str, Any]:
    """Family, model and stepping (which name a generation where the model name does not),
    and which of :data:`VECTOR_FLAGS` the CPU has; empty off Linux."""
    info = _cpuinfo()
    if not info:
        return {}
    out: dict[str, Any] = {
        key.replace(" ", "_"): info[key]
        for key in ("cpu family", "model", "stepping")
        if key in info
    }
    flags = set(info.get("flags", "").split())
    out["vector"] = [flag for flag in VECTOR_FLAGS if flag in flags]
    return out


def describe(*, with_torch: bool = True) -> dict[str, Any]:
    """What every bench reports about the machine: CPU, cores, the torch build and its
    intra-op threads, Python, the kernel, and genseg's commit. Benches add their own
    fields to it. ``with_torch`` False leaves torch out (and unimported)."""
    info: dict[str, Any] = {
        "cpu": cpu_name() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        **cpu_generation(),
    }
    if with_torch:
        import torch  # here: the event-plane bench and its worker processes never need it

        info["torch_threads"] = torch.get_num_threads()
        info["torch"] = torch.__version__
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["commit"] = git_commit()
    return info


def git_commit() -> str | None:
    """genseg's checked-out commit (short), with ``+dirty`` when tracked files differ."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, all its threads (Linux /proc);
    None where it cannot be read (no pid, the process is gone, not Linux)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent busy since boot (``/proc/stat``); None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


@dataclass
class LoadMeter:
    """Busy cores of the machine during a block, how much of it was ours, and the rest:
    the *other load* (other people's processes on a shared machine).

    ``roles`` names our processes (e.g. ``{"driver": [pid], "broker": [pid]}``); the
    report gives each role's CPU seconds, so a run shows where its cores went, and the
    CPU seconds and cores that other processes took meanwhile (busy minus ours). It also
    gives ``thread_cpu_s``, the CPU of the thread that entered the block: in an async
    bench the event loop's, which a model thread in the same process pays for again
    through the GIL (bench/gil_tax.py).
    """

    roles: dict[str, list[int]]
    wall: float = 0.0
    busy: float | None = None
    ours: float = 0.0
    by_role: dict[str, float] = field(default_factory=dict)
    load_avg_before: float = 0.0
    thread_cpu_s: float = 0.0
    _t0: float = 0.0
    _thread0: float = 0.0
    _busy0: float | None = None
    _cpu0: dict[int, float] = field(default_factory=dict)

    def __enter__(self) -> LoadMeter:
        self.load_avg_before = os.getloadavg()[0]
        self._t0, self._busy0 = time.perf_counter(), machine_busy_s()
        self._thread0 = time.thread_time()
        self._cpu0 = {
            pid: process_cpu_s(pid) or 0.0 for pids in self.roles.values() for pid in pids
        }
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.thread_cpu_s = time.thread_time() - self._thread0
        busy1 = machine_busy_s()
        if busy1 is not None and self._busy0 is not None:
            self.busy = busy1 - self._busy0
        self.by_role = {
            role: sum((process_cpu_s(pid) or self._cpu0[pid]) - self._cpu0[pid] for pid in pids)
            for role, pids in self.roles.items()
        }
        self.ours = sum(self.by_role.values())

    @property
    def other_cpu_s(self) -> float | None:
        """CPU seconds the machine spent on processes not in ``roles`` during the block."""
        return None if self.busy is None else max(self.busy - self.ours, 0.0)

    def report(self) -> dict[str, Any]:
        wall = max(self.wall, 1e-9)
        out: dict[str, Any] = {
            "ours_cpu_s": round(self.ours, 3),
            "ours_cores": round(self.ours / wall, 2),
            "cpu_s_by_role": {role: round(s, 3) for role, s in self.by_role.items()},
            "thread_cpu_s": round(self.thread_cpu_s, 3),
        }
        if self.busy is not None and self.other_cpu_s is not None:
            out["busy_cores"] = round(self.busy / wall, 2)
            out["other_cpu_s"] = round(self.other_cpu_s, 3)
            out["other_load_cores"] = round(self.other_cpu_s / wall, 2)
        out["load_avg_1m"] = round(max(self.load_avg_before, os.getloadavg()[0]), 2)
        return out


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, minimum and maximum of ``values`` (rounded), and every value in order."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "all": [round(v, digits) for v in values],
    }


def _python_loop_ms(steps: int = 1_000_000) -> float:
    t0 = time.perf_counter()
    total = 0
    for i in range(steps):
        total += i
    return (time.perf_counter() - t0) * 1000


def _syscall_us(calls: int = 100_000) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        os.getppid()
    return (time.perf_counter() - t0) / calls * 1e6


def _thread_handoff_us(trips: int = 2_000) -> float:
    """One round trip of an item between two threads (each side blocks on a queue)."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    for i in range(trips):
        there.put(i)
        back.get()
    elapsed = time.perf_counter() - t0
    there.put(None)
    thread.join()
    return elapsed / trips * 1e6


def _matmul_ms(dtype_name: str, size: int = 256, calls: int = 5) -> float:
    """One ``size`` x ``size`` matrix product in ``dtype_name`` on one torch thread."""
    import torch  # only here: the probe's other parts need the standard library alone

    from toy.bf16 import matmul_s

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_s(getattr(torch, dtype_name), size, calls) * 1000
    finally:
        torch.set_num_threads(threads)


def speed_probe(repeats: int = 3, *, with_torch: bool = True) -> dict[str, float]:
    """How fast this machine runs right now, in about a second: the median of ``repeats``
    of a 10^6-step Python loop (ms: the interpreter), a syscall (us: ``getppid``), a
    round trip between two threads (us: futex wakes and context switches, what a
    runtime's handoffs to its handler threads cost) and, ``with_torch``, a 256 x 256
    matrix product on one thread in fp32 and in bf16 (ms: the vector units; bf16 is
    tens of times slower than fp32 on a CPU without native bf16).

    A VM's speed can move 2-4x from one day to the next with no other load visible to
    it; a bench table that states these lets a reader compare machines and days.
    """
    probes: dict[str, Callable[[], float]] = {
        "python_loop_ms": _python_loop_ms,
        "syscall_us": _syscall_us,
        "thread_handoff_us": _thread_handoff_us,
    }
    if with_torch:
        probes["matmul_fp32_ms"] = lambda: _matmul_ms("float32")
        probes["matmul_bf16_ms"] = lambda: _matmul_ms("bfloat16")
    return {
        name: round(statistics.median(probe() for _ in range(repeats)), 2)
        for name, probe in probes.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--probe", action="store_true", help="print speed_probe() as JSON")
    args = parser.parse_args()
    print(json.dumps(speed_probe() if args.probe else describe(with_torch=False)))


if __name__ == "__main__":
    main()
