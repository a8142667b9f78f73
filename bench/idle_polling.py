"""Benchmark: what a waiting consumer costs, per fetch wait (``KAFKA_FETCH_MAX_WAIT_MS``).

A consumer with nothing to read sends one fetch per wait and the broker answers it empty
when the wait runs out, so a shorter wait means more empty fetches. On tansu (the
embedded broker) a longer wait also delays a record that arrives during a fetch. This
diagnostic (no target) measures both sides of that trade, side by side, on the embedded
broker, for each wait in ``--waits``:

- ``hop_ms``: a record sent while a consumer waits is read after how long (p50, max of
  ``--sends`` records sent at uneven moments);
- ``idle_cores``: the cores one idle consumer keeps busy in its process and in the broker
  over ``--idle-s`` seconds (and the machine's other load meanwhile);
- ``beside_generator``: the tiny generator (64x64, ``--steps`` steps, ``--images``
  images in batches of 4, one torch thread, in a thread of this process) while
  ``--consumers`` idle consumers poll on this process's event loop, as the seg
  runtime and a client do in ``bench/pipeline.py`` (a) while images are generated. Its
  wall seconds and this process's CPU seconds over the same generation with nothing
  polling; rounds alternate (the order flips each round), medians and spread; each
  round records the machine's other load (``bench.machine.LoadMeter``).

    python bench/idle_polling.py          # waits 10,25,50,100; 4 rounds; about 4 minutes

Prints the machine; the last line is one JSON object ``{"bench": "idle_polling", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.gen import GEN_MAX_BATCH, run_direct
from bench.harness import on_broker, quiet_logs
from bench.machine import LoadMeter, describe, spread
from bench.pipeline import prompt
from gen_worker.generate import Generator
from gen_worker.profiles import GenModels
from genseg.workers import settle_gc_for_serving
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from schemas import PromptEvent

log = logging.getLogger("bench.idle_polling")


def idle_consumer(settings: Settings, wait_ms: int) -> AIOKafkaConsumer:
    """A consumer of the asset topic from its end (nothing new comes), with no group."""
    return AIOKafkaConsumer(
        settings.topics.assets,
        fetch_max_wait_ms=wait_ms,
        auto_offset_reset="latest",
        **settings.kafka_kwargs(),
    )


async def hop_ms(settings: Settings, wait_ms: int, sends: int) -> dict[str, Any]:
    """Milliseconds from sending a record (acked) until a waiting consumer has read it."""
    producer = AIOKafkaProducer(acks="all", **settings.kafka_kwargs())
    consumer = idle_consumer(settings, wait_ms)
    await producer.start()
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=300)  # position pinned, a fetch in flight
        seconds = []
        for i in range(sends):
            await asyncio.sleep(0.13 + 0.05 * (i % 5))  # uneven moments within a fetch
            sent = time.perf_counter()
            await producer.send_and_wait(settings.topics.assets, b"x", key=b"hop")
            while not any((await consumer.getmany(timeout_ms=1000)).values()):
                if time.perf_counter() - sent > 10:
                    raise TimeoutError(
                        f"a record sent to tansu was not read in 10 s ({wait_ms} ms)"
                    )
            seconds.append(time.perf_counter() - sent)
    finally:
        await consumer.stop()
        await producer.stop()
    return {
        "p50": round(statistics.median(seconds) * 1000, 1),
        "max": round(max(seconds) * 1000, 1),
    }


async def idle_cores(
    settings: Settings, wait_ms: int, seconds: float, broker: int
) -> dict[str, float | None]:
    """Cores one idle consumer keeps busy in this process and in the broker, and the
    machine's other load meanwhile."""
    consumer = idle_consumer(settings, wait_ms)
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=300)
        with LoadMeter({"client": [os.getpid()], "broker": [broker]}) as meter:
            await consumer.getmany(timeout_ms=int(seconds * 1000))  # nothing comes: polls
    finally:
        await consumer.stop()
    report = meter.report()
    return {
        **{role: round(s / meter.wall, 3) for role, s in meter.by_role.items()},
        "other_load_cores": report.get("other_load_cores"),
    }


async def beside_generator(
    settings: Settings,
    generator: Generator,
    events: list[PromptEvent],
    wait_ms: int | None,
    consumers: int,
    broker: int,
) -> dict[str, Any]:
    """The generation with ``consumers`` idle consumers polling (None: none)."""
    polling = [idle_consumer(settings, wait_ms) for _ in range(consumers)] if wait_ms else []
    for c in polling:
        await c.start()
    tasks = [asyncio.create_task(c.getmany(timeout_ms=3_600_000)) for c in polling]
    try:
        with LoadMeter({"bench": [os.getpid()], "broker": [broker]}) as meter:
            wall = await asyncio.to_thread(run_direct, generator, events, GEN_MAX_BATCH)
    finally:
        for task in tasks:
            task.cancel()
        for c in polling:
            await c.stop()
    report = meter.report()
    return {
        "s": round(wall, 3),
        "cpu_s": report["cpu_s_by_role"]["bench"],
        "broker_cpu_s": report["cpu_s_by_role"]["broker"],
        "other_load_cores": report.get("other_load_cores"),
    }


async def bench(
    args: argparse.Namespace, bootstrap: str, blob_dir: str, broker: int | None
) -> dict[str, Any]:
    if broker is None:
        raise SystemExit(
            "bench/idle_polling.py measures the embedded broker: unset KAFKA_BOOTSTRAP_SERVERS"
        )
    settings = Settings(
        kafka_bootstrap_servers=bootstrap, topic_prefix=f"benchidle{os.getpid()}",
        blob_url=blob_dir, models="tiny",
    )  # fmt: skip
    await ensure_topics(settings, partitions=4)
    waits = [int(w) for w in args.waits.split(",")]
    result: dict[str, Any] = {"waits_ms": waits, "consumers": args.consumers}
    result["hop_ms"] = {w: await hop_ms(settings, w, args.sends) for w in waits}
    result["idle_cores"] = {w: await idle_cores(settings, w, args.idle_s, broker) for w in waits}
    log.info("hops %s; idle %s", result["hop_ms"], result["idle_cores"])

    # torch runs one intra-op thread here (main), so no second OpenMP team can slow it
    # down whichever thread builds or runs the models (bench/gen.py, "Threads").
    generator = await asyncio.to_thread(lambda: Generator(GenModels.from_settings(settings)))
    settle_gc_for_serving()
    events = [prompt(f"idle-{i:03d}", 1000 + i, 64, args.steps) for i in range(args.images)]
    await asyncio.to_thread(run_direct, generator, events[:4], GEN_MAX_BATCH)  # warm-up
    modes: list[int | None] = [None, *waits]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row: dict[str, Any] = {}
        for wait in modes if r % 2 == 0 else modes[::-1]:
            key = "alone" if wait is None else f"wait_{wait}"
            row[key] = await beside_generator(
                settings, generator, events, wait, args.consumers, broker
            )
        rounds.append(row)
        log.info("round %d: %s", r, json.dumps(row))
    result["beside_generator"] = {
        f"wait_{w}": {
            "wall_ratio": spread([row[f"wait_{w}"]["s"] / row["alone"]["s"] for row in rounds]),
            "cpu_ratio": spread(
                [row[f"wait_{w}"]["cpu_s"] / row["alone"]["cpu_s"] for row in rounds]
            ),
            "broker_cpu_s": spread([row[f"wait_{w}"]["broker_cpu_s"] for row in rounds]),
        }
        for w in waits
    }
    result["rounds"] = rounds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", default="10,25,50,100", help="fetch waits to compare, ms")
    parser.add_argument(
        "--consumers", type=int, default=3, help="idle consumers beside the generator"
    )
    parser.add_argument("--sends", type=int, default=12, help="records timed per wait (hop_ms)")
    parser.add_argument(
        "--idle-s", type=float, default=5.0, help="seconds of idle polling per wait"
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    quiet_logs()
    torch.set_num_threads(1)
    machine = describe()
    print(json.dumps({"machine": machine}), flush=True)
    result = on_broker(lambda bootstrap, blobs, pid: bench(args, bootstrap, blobs, pid))
    print(json.dumps({"bench": "idle_polling", "machine": machine, **result}))


if __name__ == "__main__":
    main()
