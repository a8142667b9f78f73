"""Benchmark: the generator worker at low load, one request at a time.

``bench/gen.py`` measures the worker at saturation, where its fetch loop is paused at
its bound while it generates. At low load (a real-time caller: publish a prompt, wait
for its image, publish the next) nothing bounds it: the question is what the worker's
event loop costs a generation that runs beside it. Side by side in one run, on one
machine, with the same loaded models, rounds alternating (the order flips each round):

- ``direct``: :meth:`gen_worker.generate.Generator.generate` on each request alone, in
  a thread of this process (no runtime exists);
- ``worker``: a :class:`GenStage` in a stage runtime at ``genseg worker``'s defaults; a
  client in a process of its own (:mod:`bench.clients`) publishes one request, reads its
  image-ready event, then publishes the next. Its fetch loop is not paused at this load:
  it sends an empty fetch each ``KAFKA_FETCH_MAX_WAIT_MS`` while the model works;
- ``polled`` (a diagnostic): ``direct`` while the worker rounds' kind of client, without
  requests, waits for image-ready events from its own process: what the client and the
  broker alone take from the generation on this machine.

Per request: the client's seconds from publish to image-ready, and the handler's own
seconds (the sum of the phases the image-ready event reports: text encoding, denoising,
VAE decoding, blob writes), each over the direct call's seconds for the same request.
The medians per round, then the median of the rounds and their spread. The handler
ratio shows the generation slowed by what runs beside it; the end-to-end ratio adds
the Kafka hops; the ``polled`` ratio, the part of that which the client and the broker
cause without any runtime. No target of its own: the gen worker's (<= 1.10) is set at saturation.

    python bench/gen_paced.py      # 8 requests a round, tiny profile, 128x128, 20 steps, 5 rounds

Prints the machine; the last line is one JSON object ``{"bench": "gen_paced", ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gen import (
    beside_polling_client,
    in_fresh_thread,
    load_generator,
    requests,
    run_direct,
    run_worker,
)
from bench.harness import on_broker, quiet_logs
from bench.machine import LoadMeter, describe, load_average, spread
from gen_worker.generate import Generator
from gen_worker.handler import GenStage
from genseg.workers import settle_gc_for_serving
from plumbing.settings import Settings
from schemas import PromptEvent

log = logging.getLogger("bench.gen_paced")

MODES = ("direct", "worker", "polled")


async def paced_round(
    stage: GenStage, settings: Settings, events: list[PromptEvent], timeout_s: float
) -> list[tuple[float, float]]:
    """Per request (end-to-end s, handler s) through a runtime started for this round."""
    timings, _ = await run_worker(
        stage, settings, events, LoadMeter({}), timeout_s, client_role="paced"
    )
    return [(end_to_end, handler) for end_to_end, handler in timings]  # JSON pairs


def direct_each(generator: Generator, events: list[PromptEvent]) -> list[float]:
    """Seconds of each request generated alone."""
    return [run_direct(generator, [e], 1) for e in events]


async def bench(args: argparse.Namespace, bootstrap: str, blob_dir: str) -> dict[str, Any]:
    info = {**describe(), "cuda": torch.cuda.is_available()}
    settings, generator = await load_generator(args, bootstrap, blob_dir, "paced")
    stage = GenStage(settings, generator=generator)
    settle_gc_for_serving()
    warm = requests(2, args.size, 2, "warm")
    await paced_round(stage, settings, warm, args.timeout)
    await in_fresh_thread(direct_each, generator, warm)
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        row: dict[str, Any] = {"round": r}
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            # The same seeds in every mode of a round: the same work.
            events = requests(args.requests, args.size, args.steps, f"{mode}-{r}", 1000 + 100 * r)
            if mode == "direct":
                seconds = await in_fresh_thread(direct_each, generator, events)
                row[mode] = {"s": round(statistics.median(seconds), 4)}
            elif mode == "polled":
                seconds = await beside_polling_client(
                    settings, LoadMeter({}), args.timeout, direct_each, generator, events
                )
                row[mode] = {"s": round(statistics.median(seconds), 4)}
            else:
                timings = await paced_round(stage, settings, events, args.timeout)
                row[mode] = {
                    "s": round(statistics.median(t for t, _ in timings), 4),
                    "handler_s": round(statistics.median(h for _, h in timings), 4),
                }
        row["ratio"] = round(row["worker"]["s"] / row["direct"]["s"], 3)
        row["handler_ratio"] = round(row["worker"]["handler_s"] / row["direct"]["s"], 3)
        row["polled_ratio"] = round(row["polled"]["s"] / row["direct"]["s"], 3)
        rounds.append(row)
        log.info("round %d: %s", r, json.dumps(row))
    return {
        "bench": "gen_paced",
        "profile": args.profile,
        "size": args.size,
        "steps": args.steps,
        "requests_per_round": args.requests,
        "repeats": args.repeats,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "direct_s": spread([row["direct"]["s"] for row in rounds], 4),
        "ratio": spread([row["ratio"] for row in rounds]),
        "handler_ratio": spread([row["handler_ratio"] for row in rounds]),
        "polled_ratio": spread([row["polled_ratio"] for row in rounds]),
        "load_avg_after": load_average(),
        "rounds": rounds,
        "machine": info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests a round, one at a time")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", default="tiny", choices=["tiny", "random", "pretrained"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    quiet_logs(("aiokafka", "diffusers", "transformers", "consumers", "gen_worker"))
    log.setLevel(logging.INFO)

    print("machine:", json.dumps(describe()))
    result = on_broker(lambda bootstrap, blobs, _pid: bench(args, bootstrap, blobs))
    print(
        f"one request at a time, worker / direct call, median of {result['repeats']} rounds: "
        f"{result['ratio']['median']:.3f} end to end, "
        f"{result['handler_ratio']['median']:.3f} in its handler; the direct call beside an "
        f"idle client {result['polled_ratio']['median']:.3f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
