"""What the Kafka benchmarks share around their measurements: quiet library logs, and a
broker to run on (``KAFKA_BOOTSTRAP_SERVERS``, else an embedded tansu for the run)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from plumbing.broker import EmbeddedBroker

#: The loggers whose INFO lines would bury a benchmark's own.
NOISY = ("aiokafka", "diffusers", "transformers", "consumers", "gen_worker", "seg_worker", "genseg")


def quiet_logs(noisy: tuple[str, ...] = NOISY) -> None:
    """INFO logging with timestamps, the ``noisy`` libraries at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)


def on_broker(
    bench: Callable[[str, str, int | None], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """``bench(bootstrap, blob_dir, broker_pid)`` in a temporary directory, on
    ``KAFKA_BOOTSTRAP_SERVERS`` when set (no pid: its CPU is not ours to count), else on
    an embedded broker started for the run."""
    with tempfile.TemporaryDirectory(prefix="genseg-bench-") as tmp:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if bootstrap:
            return asyncio.run(bench(bootstrap, tmp, None))
        with EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker:
            return asyncio.run(bench(broker.bootstrap_servers, tmp + "/blobs", broker.pid))


__all__ = ["NOISY", "on_broker", "quiet_logs"]
