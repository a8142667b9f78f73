"""Diagnostic: what the event loop's work costs a generation in a thread of the same process.

A worker process runs its model on the runtime's thread and its Kafka clients on the
event loop (:mod:`consumers.runtime`); both need the GIL. This measures, side by side in
one process, the tiny generator (64x64, ``--steps`` steps, ``--images`` images in
batches of 4, **one torch thread**: a core stays free, so the two threads share only
the GIL) while the event loop

- ``idle``: only awaits the generation;
- ``wakes``: wakes every ``--period-ms`` and does nothing;
- ``python``: wakes and runs ``--burst-ms`` of Python (it holds the GIL);
- ``gil_free``: wakes and spends ``--burst-ms`` of CPU in :mod:`hashlib`, which
  releases the GIL (the same CPU, on the free core).

Modes take turns for ``--rounds`` rounds (the order flips each round). Per mode: the wall
ratio to ``idle`` of the same round (median, spread), the process's CPU ratio, and what
one wake cost the generation in microseconds (the wall added over ``idle``, over the
wakes). No target: docs/benchmarks.md ("Where the gen worker's extra time goes on the
Zen 3") reads it to explain the gen worker's overhead on the 2-core machine. No broker.

    python bench/gil_tax.py   # 16 images, 8 rounds, a wake each 7 ms, 0.3 ms bursts: ~4 min

Prints the machine; the last line is one JSON object ``{"bench": "gil_tax", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gen import GEN_MAX_BATCH, in_fresh_thread, requests, run_direct
from bench.harness import quiet_logs
from bench.machine import LoadMeter, describe, spread
from gen_worker.generate import Generator
from gen_worker.profiles import GenModels
from genseg.workers import settle_gc_for_serving
from plumbing.settings import Settings

log = logging.getLogger("bench.gil_tax")
MODES = ("idle", "wakes", "python", "gil_free")
#: hashlib releases the GIL while it hashes more than 2 KiB; 64 KiB take about 45 us here.
_CHUNK = os.urandom(64 * 1024)


def python_burst(seconds: float) -> None:
    """Run Python (holding the GIL) for ``seconds``."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        sum(range(50))


def gil_free_burst(seconds: float) -> None:
    """Spend about ``seconds`` of CPU with the GIL released (between hashes, briefly held)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        hashlib.sha256(_CHUNK).digest()


async def load(mode: str, period_s: float, burst_s: float, stop: asyncio.Event) -> int:
    """Wake every ``period_s`` until ``stop``, doing ``mode``'s burst; the wakes."""
    burst = {"python": python_burst, "gil_free": gil_free_burst}.get(mode)
    wakes = 0
    while not stop.is_set():
        await asyncio.sleep(period_s)
        wakes += 1
        if burst is not None:
            burst(burst_s)
    return wakes


async def one_mode(
    mode: str, generator: Generator, args: argparse.Namespace, round_: int
) -> dict[str, Any]:
    """The generation while the event loop does ``mode``: wall and CPU seconds, wakes."""
    events = requests(args.images, 64, args.steps, f"{mode}{round_}", 1000 + 100 * round_)
    stop = asyncio.Event()
    loader = None
    if mode != "idle":
        loader = asyncio.create_task(load(mode, args.period_ms / 1000, args.burst_ms / 1000, stop))
    with LoadMeter({"bench": [os.getpid()]}) as meter:
        seconds = await in_fresh_thread(run_direct, generator, events, GEN_MAX_BATCH)
    stop.set()
    wakes = await loader if loader is not None else 0
    return {
        "s": round(seconds, 3),
        "cpu_s": round(meter.by_role["bench"], 3),
        "wakes": wakes,
        "other_load_cores": meter.report().get("other_load_cores"),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(models="tiny", device="cpu")  # no blobs are written
    generator = await in_fresh_thread(lambda: Generator(GenModels.from_settings(settings)))
    settle_gc_for_serving()
    await in_fresh_thread(run_direct, generator, requests(2, 64, 2, "warm"), GEN_MAX_BATCH)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row = {
            mode: await one_mode(mode, generator, args, r)
            for mode in (MODES if r % 2 == 0 else MODES[::-1])
        }
        rounds.append(row)
        log.info("round %d: %s", r, json.dumps(row))

    def cost_us(row: dict[str, Any], mode: str) -> float:
        added = row[mode]["s"] - row["idle"]["s"]
        return added / max(row[mode]["wakes"], 1) * 1e6

    loaded = [m for m in MODES if m != "idle"]
    return {
        "images": args.images,
        "steps": args.steps,
        "period_ms": args.period_ms,
        "burst_ms": args.burst_ms,
        "wall_ratio": {
            m: spread([row[m]["s"] / row["idle"]["s"] for row in rounds]) for m in loaded
        },
        "cpu_ratio": {
            m: spread([row[m]["cpu_s"] / max(row["idle"]["cpu_s"], 1e-9) for row in rounds])
            for m in loaded
        },
        "us_per_wake": {
            m: round(statistics.median(cost_us(row, m) for row in rounds), 1) for m in loaded
        },
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--period-ms", type=float, default=7.0, help="between the loop's wakes")
    parser.add_argument("--burst-ms", type=float, default=0.3, help="work per wake")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    quiet_logs()
    torch.set_num_threads(1)  # a free core: the threads share the GIL, not a core
    machine = describe()
    print(json.dumps({"machine": machine}), flush=True)
    result = asyncio.run(bench(args))
    print(json.dumps({"bench": "gil_tax", "machine": machine, **result}))


if __name__ == "__main__":
    main()
