"""Requests through the gateway and the real pipeline: status, blobs, SSE, restarts.

The generator and segmenter runtimes run in this process with the tiny models (as
``genseg demo`` does), on the session's tansu broker; gateways are uvicorn servers on
127.0.0.1 (in this event loop, or a ``python -m genseg.gateway`` process), called
over TCP with httpx.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from plumbing.blobstore import BlobStore
from plumbing.broker import EmbeddedBroker, free_port
from plumbing.settings import Settings
from schemas import BlobRef
from tests.kafka_utils import TopicReader
from tests.test_gateway_helpers import (
    OUTCOME_S,
    fresh_settings,
    gateway,
    pipeline,
    read_sse,
    tiny_body,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
#: Fields of a status body that name the gateway that answered.
URL_FIELDS = ("status_url", "events_url", "image_url", "url")


@pytest.fixture(scope="module")
def flow_settings(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return fresh_settings(broker.bootstrap_servers, tmp_path_factory.mktemp("blobs"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workers(flow_settings: Settings) -> AsyncIterator[None]:
    async with pipeline(flow_settings):
        yield


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(
    flow_settings: Settings, workers: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    db = tmp_path_factory.mktemp("view") / "view.sqlite3"
    async with gateway(flow_settings, db) as (_gw, http):
        yield http


async def submit_and_wait(http: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await http.post(f"/v1/requests?wait={OUTCOME_S:.0f}", json=tiny_body(**overrides))
    assert response.status_code == 200, response.text
    return dict(response.json())


def without_urls(value: Any) -> Any:
    """A status body less what depends on the gateway that answered (its URLs)."""
    if isinstance(value, dict):
        return {k: without_urls(v) for k, v in value.items() if k not in URL_FIELDS}
    if isinstance(value, list):
        return [without_urls(v) for v in value]
    return value


async def until_ok(
    http: httpx.AsyncClient, path: str, timeout: float = 60.0, status: str | None = None
) -> Any:
    """The JSON body of ``GET path`` once it answers 200 (and, given ``status``, once the
    body's ``status`` is that)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get(path)
        if response.status_code == 200 and status in (None, response.json().get("status")):
            return response.json()
        assert time.monotonic() < deadline, f"{path}: {response.status_code} {response.text}"
        await asyncio.sleep(0.1)


def lose_view(db: Path) -> None:
    for path in db.parent.glob(f"{db.name}*"):  # the file and its WAL
        path.unlink()


def records_read(metrics_text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "genseg_gateway_view_records_total"
    )


async def test_submit_wait_then_status_and_blobs(
    client: httpx.AsyncClient, flow_settings: Settings
) -> None:
    status = await submit_and_wait(client, id="flow-1")
    assert status["status"] == "done", status
    assert status["progress"] == {"step": 4, "steps": 4}
    (image,) = status["images"]
    assert image["image_index"] == 0 and image["status"] in ("ok", "no_match")
    assert image["asset_status"] == image["status"] and image["error"] is None
    assert image["assets"], "min_confidence 0 keeps every mask: at least one cut-out"

    # The asset-ready event on the topic is what the status says.
    async with TopicReader(flow_settings, "assets") as reader:
        await reader.until(lambda: "flow-1" in reader.keys("assets"))
    event = next(v for v in reader.values("assets") if v["id"] == "flow-1")
    assert [a["label"] for a in image["assets"]] == [a["label"] for a in event["assets"]]
    assert [a["bbox"] for a in image["assets"]] == [a["bbox"] for a in event["assets"]]

    png = await client.get(image["image_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    sha = hashlib.sha256(png.content).hexdigest()
    assert png.headers["etag"] == f'"{sha}"' and sha == event["image"]["sha256"]
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    cached = await client.get(image["image_url"], headers={"If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["etag"] == f'"{sha}"'
    stale = await client.get(image["image_url"], headers={"If-None-Match": '"0000"'})
    assert stale.status_code == 200

    cutout = await client.get(image["assets"][0]["url"])
    assert cutout.status_code == 200
    assert Image.open(io.BytesIO(cutout.content)).mode == "RGBA"
    store = BlobStore.from_url(flow_settings.blob_url)
    assert cutout.content == store.get(BlobRef.model_validate(event["assets"][0]["asset"]))


async def test_events_stream_live_and_replay_from_the_start(
    client: httpx.AsyncClient, flow_settings: Settings
) -> None:
    accepted = (await client.post("/v1/requests", json=tiny_body(id="flow-sse"))).json()
    live = asyncio.create_task(read_sse(client, accepted["events_url"]))
    await client.post(f"/v1/requests?wait={OUTCOME_S:.0f}", json=tiny_body(id="flow-sse"))
    live_events = await asyncio.wait_for(live, OUTCOME_S)
    late_events = await read_sse(client, accepted["events_url"])  # after the end

    kinds = [e.event for e in late_events]
    # Every progress record of the request is in the stream (the generator sends one
    # every 0.5 s at most, and the last step always).
    async with TopicReader(flow_settings, "progress", "assets") as reader:
        await reader.until(lambda: "flow-sse" in reader.keys("assets"))
    assert kinds.count("progress") == reader.keys("progress").count("flow-sse") >= 1
    assert kinds[-1] == "end" and late_events[-1].json()["status"] == "done"
    assert {"image", "masks", "asset"} <= set(kinds)
    assert kinds.index("image") < kinds.index("asset")
    steps = [e.json()["step"] for e in late_events if e.event == "progress"]
    assert steps == sorted(steps) and steps[-1] == 4
    assert all(e.json()["id"] == "flow-sse" for e in late_events if e.event != "end")
    assert [(e.id, e.event, e.data) for e in live_events] == [
        (e.id, e.event, e.data) for e in late_events
    ]
    # A reconnecting client (Last-Event-ID) gets only what follows.
    image_event = next(e for e in late_events if e.event == "image")
    rest = await read_sse(
        client, accepted["events_url"], headers={"Last-Event-ID": str(image_event.id)}
    )
    assert [e.id for e in rest] == [e.id for e in late_events[kinds.index("image") + 1 :]]


async def test_a_failed_request_says_why(
    client: httpx.AsyncClient, flow_settings: Settings
) -> None:
    store = BlobStore.from_url(flow_settings.blob_url)
    missing = {
        "uri": store.uri_for("nowhere/0/upload/image.png"),
        "sha256": "0" * 64,
        "media_type": "image/png",
        "bytes": 10,
    }
    body = tiny_body(id="flow-fail", schema="genseg.inpaint/v1", image=missing, mask=missing)
    response = await client.post(f"/v1/requests?wait={OUTCOME_S:.0f}", json=body)
    status = response.json()
    assert response.status_code == 200 and status["status"] == "failed", status
    failure = status["images"][0]["error"] or status["error"]
    assert failure["stage"] == "gen" and failure["type"] == "blob_not_found", failure
    assert status["images"][0]["status"] == "failed"
    events = await read_sse(client, status["events_url"])
    assert [e.event for e in events][-2:] == ["dead_letter", "end"]


async def test_two_gateways_side_by_side_both_answer(
    client: httpx.AsyncClient, flow_settings: Settings, tmp_path: Path
) -> None:
    status = await submit_and_wait(client, id="flow-two")
    async with gateway(flow_settings, tmp_path / "other.sqlite3") as (_gw, other):
        seen = await until_ok(other, "/v1/requests/flow-two", status=status["status"])
        assert without_urls(seen) == without_urls(status)
        assert seen["status_url"].startswith(str(other.base_url).rstrip("/"))
        blob = await other.get(seen["images"][0]["image_url"])
        assert blob.status_code == 200
        # ...and the other way round: a request posted to the second gateway.
        posted = await other.post("/v1/requests", json=tiny_body(id="flow-two-b"))
        assert posted.status_code == 202
        await until_ok(client, "/v1/requests/flow-two-b")


async def test_delete_erases_the_request_everywhere_and_for_good(
    client: httpx.AsyncClient, flow_settings: Settings, tmp_path: Path
) -> None:
    """DELETE: every blob gone from the store, the request gone from this gateway and,
    through the deletion event, from another one; a second DELETE is 404."""
    status = await submit_and_wait(client, id="flow-delete")
    async with gateway(flow_settings, tmp_path / "other.sqlite3") as (_gw, other):
        await until_ok(other, "/v1/requests/flow-delete")
        image_url = status["images"][0]["image_url"]
        store = BlobStore.from_url(flow_settings.blob_url)
        assert store.list_keys("flow-delete/"), "the request wrote blobs"

        deleted = await client.delete("/v1/requests/flow-delete")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["id"] == "flow-delete" and deleted.json()["blobs_deleted"] > 0
        assert store.list_keys("flow-delete/") == []
        assert (await client.get("/v1/requests/flow-delete")).status_code == 404
        assert (await client.get(image_url)).status_code == 404
        assert (await client.delete("/v1/requests/flow-delete")).status_code == 404

        deadline = time.monotonic() + 60
        while (await other.get("/v1/requests/flow-delete")).status_code != 404:
            assert time.monotonic() < deadline, "the other gateway never forgot it"
            await asyncio.sleep(0.1)
    async with TopicReader(flow_settings, "deletions") as reader:
        await reader.until(lambda: "flow-delete" in reader.keys("deletions"))


async def test_status_survives_a_restart_and_a_lost_view_is_rebuilt(
    client: httpx.AsyncClient, flow_settings: Settings, tmp_path: Path
) -> None:
    db = tmp_path / "view.sqlite3"
    async with gateway(flow_settings, db) as (_gw, first):
        status = await submit_and_wait(first, id="flow-restart")
        assert records_read((await first.get("/metrics")).text) > 0

    async with gateway(flow_settings, db) as (_gw, second):
        # Answered from the view at once, and nothing read again from the topics.
        assert without_urls((await second.get("/v1/requests/flow-restart")).json()) == (
            without_urls(status)
        )
        await until_ok(second, "/readyz")
        assert records_read((await second.get("/metrics")).text) == 0

    lose_view(db)
    async with gateway(flow_settings, db) as (_gw, third):
        await until_ok(third, "/readyz")
        rebuilt = (await third.get("/v1/requests/flow-restart")).json()
        assert without_urls(rebuilt) == without_urls(status)
        assert records_read((await third.get("/metrics")).text) > 0


async def test_the_gateway_process_serves_and_stops_on_sigterm(
    client: httpx.AsyncClient, flow_settings: Settings, tmp_path: Path
) -> None:
    status = await submit_and_wait(client, id="flow-process")
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": flow_settings.kafka_bootstrap_servers,
        "GENSEG_TOPIC_PREFIX": flow_settings.topic_prefix,
        "GENSEG_BLOB_URL": flow_settings.blob_url,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "genseg.gateway", "--listen", f"127.0.0.1:{port}",
        "--db", str(tmp_path / "p.sqlite3"),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        output = b""
        while f"listening on http://127.0.0.1:{port}".encode() not in output:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, f"the gateway exited:\n{output.decode()}"
            output += line
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            # The new gateway rebuilds its view from the topics: it knows the request
            # (from the prompts topic) before it has read the request's outcome.
            seen = await until_ok(http, "/v1/requests/flow-process", status=status["status"])
            assert without_urls(seen) == without_urls(status)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_tenants_see_only_their_requests_and_blobs(
    flow_settings: Settings, workers: None, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[keys]\n"k-acme-0123456789abcdef" = "acme"\n"k-globex-0123456789abcd" = "globex"\n'
    )
    acme = {"Authorization": "Bearer k-acme-0123456789abcdef"}
    globex = {"Authorization": "Bearer k-globex-0123456789abcd"}
    settings = flow_settings.model_copy(update={"api_keys": str(keys)})
    async with gateway(settings, tmp_path / "view.sqlite3") as (_gw, http):
        response = await http.post(
            f"/v1/requests?wait={OUTCOME_S:.0f}", json=tiny_body(id="flow-acme"), headers=acme
        )
        status = response.json()
        assert response.status_code == 200 and status["status"] == "done", status
        assert status["tenant"] == "acme"
        urls = [
            status["images"][0]["image_url"],
            *(a["url"] for a in status["images"][0]["assets"]),
        ]
        for url in urls:
            assert (await http.get(url, headers=acme)).status_code == 200
            for headers in (globex, {}):
                assert (await http.get(url, headers=headers)).status_code in (401, 404)
            assert (await http.get(url, headers=globex)).json()["error"] == "not_found"
        # A blob of a request without a tenant (submitted on the open gateway) is nobody's.
        other = (await http.get("/v1/requests/flow-1", headers=acme)).status_code
        assert other == 404
        # Another tenant cannot delete it (answered like a missing request); its own can,
        # and its blobs, under the tenant's key prefix, are gone.
        refused = await http.delete("/v1/requests/flow-acme", headers=globex)
        assert refused.status_code == 404
        assert (await http.get(urls[0], headers=acme)).status_code == 200
        assert (await http.delete("/v1/requests/flow-acme", headers=acme)).status_code == 200
        assert (await http.get(urls[0], headers=acme)).status_code == 404
        store = BlobStore.from_url(flow_settings.blob_url)
        assert store.list_keys("tenants/acme/flow-acme/") == []
