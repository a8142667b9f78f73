"""Running a benchmark script as its users do, for the tests that check what it reports."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]


def run_bench(
    script: str,
    *args: str,
    tmp_path: Path,
    timeout: float = 600,
    session_timeout_ms: int | None = 6000,
) -> dict[str, Any]:
    """Run ``bench/<script>`` with ``args`` in a clean environment (no Kafka, genseg or
    OpenTelemetry settings of the test run: its own embedded broker) and return the JSON
    object of its last line; fails the test with the output's tail when it exits non-zero.

    ``session_timeout_ms``: the runtimes' ``KAFKA_SESSION_TIMEOUT_MS`` (None: the default,
    10 s). A shorter session only makes each group join on tansu quicker (half of it),
    which these tests do not measure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "GENSEG_", "OTEL_"))}
    if session_timeout_ms is not None:
        env["KAFKA_SESSION_TIMEOUT_MS"] = str(session_timeout_ms)
    env["TMPDIR"] = str(tmp_path)
    command = [sys.executable, f"bench/{script}", *args]
    done = forkserver.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
