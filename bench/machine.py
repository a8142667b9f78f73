"""What the bench scripts say about the machine they ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe() -> dict[str, Any]:
    """What every bench reports about the machine: CPU, cores, the torch build and its
    intra-op threads, Python. Benches add their own fields to it."""
    import torch  # here: the event-plane bench and its worker processes never need it

    return {
        "cpu": cpu_name() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


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
