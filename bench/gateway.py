"""Benchmark: the HTTP gateway. POST latency against the Kafka client, and SSE fan-out.

Everything runs on one embedded tansu broker this script starts; the gateway runs as a
process of its own (``python -m genseg.gateway``, as deployed), the load comes from
this process.

1. POST latency: ``--rate`` requests per second, paced (one started every 1/rate s
   whatever the earlier ones do), ``--requests`` per round, rounds alternating between
   ``POST /v1/requests`` to the gateway (httpx, keep-alive) and
   :meth:`producers.GensegClient.submit` in this process (the same event published
   straight to the prompts topic, acknowledged by the broker). Both wait for the
   broker's acknowledgement (the gateway answers 202 after it). Latency of one call:
   from its start to its answer. Each path's median round counts; ``added_p50_ms``
   is gateway minus client (target: at most 5 ms). No workers run: only submitting
   is measured. The gateway's CPU per request comes from /proc.
2. SSE fan-out: ``--watchers`` clients follow ``GET /v1/requests/{id}/events`` of one
   request; once all are connected, this process publishes that request's events as
   the stages would (``--progress`` progress events every ``--progress-interval-ms``,
   then image-ready, mask-ready and asset-ready; no models, so the cores go to the
   gateway and the watchers). Every watcher must see every event, in order, then
   ``end``. Delivery latency: from the publish to a watcher's receipt.

Prints the machine, one JSON line per round and, as the last line, one JSON object
``{"bench": "gateway", ...}``.

    python bench/gateway.py                        # 6 rounds of 500 at 100/s; 500 watchers
    python bench/gateway.py --rounds 2 --requests 200 --watchers 50   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.machine import describe, process_cpu_s
from plumbing.blobstore import BlobStore, blob_key
from plumbing.broker import EmbeddedBroker, free_port
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.client import GensegClient
from producers.publisher import Publisher
from schemas import (
    AssetItem,
    AssetReadyEvent,
    ImageReadyEvent,
    MaskObject,
    MasksReadyEvent,
    ProgressEvent,
    ResolvedParams,
)

log = logging.getLogger("bench.gateway")
ROOT = Path(__file__).resolve().parents[1]
BODY = {"prompt": "a red circle next to a blue square", "targets": ["circle"], "width": 64,
        "height": 64, "steps": 4, "seed": 7}  # fmt: skip


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``; Linux)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Load:
    """Cores busy with other work than ours (this process, the gateway, the broker)
    while a block runs: a round on a machine that others load says so."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.ours = {"gateway_cpu_s": 0.0}

    def __enter__(self) -> Load:
        self._t0, self._busy0 = time.perf_counter(), machine_busy_s()
        self._cpu0 = [process_cpu_s(pid) or 0.0 for pid in self.pids]
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        used = [(process_cpu_s(p) or 0.0) - c0 for p, c0 in zip(self.pids, self._cpu0, strict=True)]
        self.ours = {"gateway_cpu_s": used[1], "ours_cores": sum(used) / wall}
        self.other_cores = max(machine_busy_s() - self._busy0 - sum(used), 0.0) / wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def launch_gateway(settings: Settings, folder: Path, port: int) -> subprocess.Popen[bytes]:
    """``python -m genseg.gateway`` on ``port``, its log in ``folder``."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "GENSEG_TOPIC_PREFIX": settings.topic_prefix,
        "GENSEG_BLOB_URL": settings.blob_url,
        "GENSEG_MODELS": "tiny",
    }
    command = [sys.executable, "-m", "genseg.gateway", "--listen", f"127.0.0.1:{port}",
               "--db", str(folder / "view.sqlite3")]  # fmt: skip
    with (folder / "gateway.log").open("wb") as log_file:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=log_file)


async def start_gateway(settings: Settings, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = launch_gateway(settings, folder, port)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as http:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start; see {folder / 'gateway.log'}")
            await asyncio.sleep(0.1)


async def paced(call: Any, count: int, rate: float) -> list[float]:
    """Start ``call(i)`` every 1/rate s, ``count`` times; each call's latency in ms."""
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - started) * 1000)

    tasks = []
    t0 = time.perf_counter()
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latencies


async def post_rounds(
    args: argparse.Namespace, url: str, client: GensegClient, pids: list[int]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:

        async def via_gateway(i: int) -> None:
            response = await http.post("/v1/requests", json=BODY)
            assert response.status_code == 202, response.text

        async def via_client(i: int) -> None:
            await client.submit(**BODY)

        paths = {"gateway": via_gateway, "client": via_client}
        for call in paths.values():  # warm-up: connections, the view's first writes
            await paced(call, int(args.rate), args.rate)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for round_no in range(args.rounds):
            # gateway, client, client, gateway, gateway, ...: neither always goes first
            name = ("gateway", "client")[(round_no + 1) // 2 % 2]
            with Load(pids) as load:
                latencies = await paced(paths[name], args.requests, args.rate)
            cpu_used = load.ours["gateway_cpu_s"]
            result = {
                "round": round_no,
                "path": name,
                "p50_ms": round(percentile(latencies, 0.5), 3),
                "p99_ms": round(percentile(latencies, 0.99), 3),
                "max_ms": round(max(latencies), 3),
                "gateway_cpu_ms_per_request": round(cpu_used * 1000 / args.requests, 3),
                "ours_cores": round(load.ours["ours_cores"], 2),
                "other_load_cores": round(load.other_cores, 2),
            }
            rounds[name].append(result)
            print(json.dumps(result), flush=True)

    def summary(name: str, key: str) -> dict[str, float]:
        values = [r[key] for r in rounds[name]]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out: dict[str, Any] = {"rate_per_s": args.rate, "requests_per_round": args.requests,
                           "rounds_per_path": len(rounds["gateway"])}  # fmt: skip
    for name in paths:
        out[f"{name}_p50_ms"] = summary(name, "p50_ms")
        out[f"{name}_p99_ms"] = summary(name, "p99_ms")
    out["gateway_cpu_ms_per_request"] = summary("gateway", "gateway_cpu_ms_per_request")["median"]
    out["other_load_cores_max"] = max(r["other_load_cores"] for rs in rounds.values() for r in rs)
    added = out["gateway_p50_ms"]["median"] - out["client_p50_ms"]["median"]
    out["added_p50_ms"] = round(added, 3)
    out["added_p99_ms"] = round(out["gateway_p99_ms"]["median"] - out["client_p99_ms"]["median"], 3)
    out["target_added_p50_ms"] = 5.0
    out["met"] = added <= 5.0
    return out


def pipeline_events(settings: Settings, request_id: str, steps: int) -> list[Any]:
    """What the stages publish for one request, with real blobs behind the references."""
    store = BlobStore.from_url(settings.blob_url)
    png = bytes.fromhex(  # a 1x1 PNG: the watchers never read the pixels
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
    image = store.put(blob_key(request_id, 0, "gen", "image.png"), png, "image/png")
    mask = store.put(blob_key(request_id, 0, "seg", "mask-0.png"), png, "image/png")
    asset = store.put(blob_key(request_id, 0, "seg", "asset-0.png"), png, "image/png")
    params = ResolvedParams(prompt=BODY["prompt"], width=64, height=64, steps=steps,
                            guidance_scale=7.5, sampler="dpmpp_2m", seed=7)  # fmt: skip
    rle = {"size": [64, 64], "counts": "0"}
    obj = MaskObject(label="circle", score=0.9, bbox=[1, 1, 10, 10], area=100, mask=mask, rle=rle)
    item = AssetItem(label="circle", score=0.9, bbox=[1, 1, 10, 10], asset=asset)
    t = settings.topics
    progress = [ProgressEvent(id=request_id, step=i, steps=steps) for i in range(1, steps + 1)]
    return [
        *((t.progress, event) for event in progress),
        (t.images, ImageReadyEvent(id=request_id, image=image, params=params, model="bench")),
        (t.masks, MasksReadyEvent(id=request_id, image=image, objects=[obj])),
        (t.assets, AssetReadyEvent(id=request_id, status="ok", assets=[item], image=image,
                                   masks=[mask])),
    ]  # fmt: skip


async def watch(
    http: httpx.AsyncClient, url: str, connected: asyncio.Queue[None]
) -> list[tuple[str, str, float]]:
    """(id, event, received at) of every event of one stream until ``end``."""
    seen: list[tuple[str, str, float]] = []
    async with http.stream("GET", url) as response:
        assert response.status_code == 200
        fields: dict[str, str] = {}
        first = True
        async for line in response.aiter_lines():
            if first:
                connected.put_nowait(None)  # the "retry:" line: the stream is open
                first = False
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "event" in fields:
                seen.append((fields.get("id", ""), fields["event"], time.time()))
                if fields["event"] == "end":
                    return seen
            fields = {}
    return seen


async def sse_fanout(
    args: argparse.Namespace, settings: Settings, url: str, pids: list[int]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.watchers + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        accepted = (await http.post("/v1/requests", json={**BODY, "id": "bench-sse"})).json()
        connected: asyncio.Queue[None] = asyncio.Queue()
        watchers = [
            asyncio.create_task(watch(http, accepted["events_url"], connected))
            for _ in range(args.watchers)
        ]
        for _ in range(args.watchers):
            await asyncio.wait_for(connected.get(), 120)
        sent: list[float] = []
        with Load(pids) as load:
            async with Publisher(settings) as publisher:
                events = pipeline_events(settings, "bench-sse", args.progress)
                for topic, event in events:
                    await publisher.publish(topic, event)
                    sent.append(time.time())
                    if isinstance(event, ProgressEvent):
                        await asyncio.sleep(args.progress_interval_ms / 1000)
            results = await asyncio.wait_for(asyncio.gather(*watchers), 300)
    expected = [kind for kind in ("progress",) * args.progress] + ["image", "masks", "asset", "end"]
    streams = [[(i, kind) for i, kind, _ in seen] for seen in results]
    identical = all(s == streams[0] for s in streams)
    complete = all([kind for _, kind in s] == expected for s in streams)
    delays = [
        (seen[k][2] - sent[k]) * 1000 for seen in results for k in range(len(sent))
        if len(seen) > k
    ]  # fmt: skip
    last = [max(seen[k][2] for seen in results) - sent[k] for k in range(len(sent))]
    return {
        "watchers": args.watchers,
        "events": len(sent),
        "all_saw_every_event": identical and complete,
        "delivery_p50_ms": round(percentile(delays, 0.5), 1),
        "delivery_p99_ms": round(percentile(delays, 0.99), 1),
        "last_watcher_p50_ms": round(statistics.median(last) * 1000, 1),
        "last_watcher_max_ms": round(max(last) * 1000, 1),
        "gateway_cpu_s": round(load.ours["gateway_cpu_s"], 2),
        "ours_cores": round(load.ours["ours_cores"], 2),
        "other_load_cores": round(load.other_cores, 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        folder = Path(tmp)
        settings = Settings(kafka_bootstrap_servers=broker.bootstrap_servers,
                            topic_prefix="bench", blob_url=str(folder / "blobs"))  # fmt: skip
        await ensure_topics(settings, partitions=4)
        proc, url = await start_gateway(settings, folder)
        try:
            pids = [os.getpid(), proc.pid, broker.pid or 0]
            async with GensegClient(settings) as client:
                post = await post_rounds(args, url, client, pids)
            sse = await sse_fanout(args, settings, url, pids)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"bench": "gateway", "machine": describe(), "post": post, "sse": sse}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="POSTs per second")
    parser.add_argument("--requests", type=int, default=500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, alternating paths")
    parser.add_argument("--watchers", type=int, default=500, help="SSE clients of one request")
    parser.add_argument("--progress", type=int, default=25, help="progress events")
    parser.add_argument("--progress-interval-ms", type=float, default=100.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    machine = describe()
    for key, value in machine.items():
        print(f"{key:>14}: {value}")
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
