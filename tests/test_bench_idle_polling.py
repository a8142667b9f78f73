"""bench/idle_polling.py runs end to end at a tiny size and reports what docs/benchmarks.md
reads from it (the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_idle_polling_bench_reports_each_wait(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "GENSEG_", "OTEL_"))}
    env["TMPDIR"] = str(tmp_path)
    command = [
        sys.executable, "bench/idle_polling.py", "--waits", "10,50", "--sends", "2",
        "--idle-s", "0.3", "--images", "4", "--steps", "2", "--rounds", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "idle_polling" and result["waits_ms"] == [10, 50]
    for wait in ("10", "50"):
        hop = result["hop_ms"][wait]
        assert 0 < hop["p50"] <= hop["max"] < 2000, "each record was read, within the poll"
        assert set(result["idle_cores"][wait]) == {"client", "broker"}
    rounds = result["rounds"]
    assert list(rounds[0]) == ["alone", "wait_10", "wait_50"]
    assert list(rounds[1]) == ["wait_50", "wait_10", "alone"], "the modes take turns"
    for key in ("wait_10", "wait_50"):
        ratios = result["beside_generator"][key]["wall_ratio"]["all"]
        assert ratios == [round(r[key]["s"] / r["alone"]["s"], 3) for r in rounds]
