"""The gateway's HTTP API without workers: bad input, ids, idempotence, auth, operations.

One gateway (uvicorn on 127.0.0.1, the session's tansu broker) serves the module;
every bad request must be a 4xx JSON error that says what is wrong, with nothing
published to the prompts topic and the gateway still answering afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from genseg.gateway import Gateway, GatewayConfig, GatewayStartError
from genseg.gateway.server import warn_if_open
from plumbing.broker import EmbeddedBroker, free_port
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from tests.test_gateway_helpers import fresh_settings, gateway, tiny_body, topic_size

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

KEYS = {"k-acme-0123456789abcdef": "acme", "k-globex-0123456789abcd": "globex"}


@pytest.fixture(scope="module")
def api_settings(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return fresh_settings(broker.bootstrap_servers, tmp_path_factory.mktemp("blobs"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(
    api_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    await ensure_topics(api_settings)
    db = tmp_path_factory.mktemp("view") / "view.sqlite3"
    async with gateway(api_settings, db) as (_gw, http):
        yield http


async def eventually_ok(http: httpx.AsyncClient, path: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get(path)
        if response.status_code == 200:
            return response.json()
        assert time.monotonic() < deadline, f"{path}: {response.status_code} {response.text}"
        await asyncio.sleep(0.1)


def assert_json_error(response: httpx.Response, status: int, error: str | None = None) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["message"], body
    if error is not None:
        assert body["error"] == error, body
    return body


# --- bad input ---------------------------------------------------------------------------

HOSTILE_CALLBACKS = [
    "http://10.0.0.5/hook",  # private
    "http://192.168.1.1/hook",  # private
    "http://169.254.169.254/latest/meta-data/",  # link-local: the cloud metadata service
    "http://metadata.google.internal/computeMetadata/v1/",  # a metadata name
    "http://[::1]:8080/hook",  # loopback, IPv6
    "http://127.0.0.2/hook",  # loopback
    "http://localhost/hook",  # a loopback name
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped link-local
]


def _bad_bodies() -> list[Any]:
    big = json.dumps(tiny_body(negative_prompt="x" * 100, pad="y" * 300_000)).encode()
    cases: list[tuple[str, bytes, int, str, str | None]] = [
        ("malformed JSON", b'{"prompt": ', 400, "malformed_json", None),
        ("not UTF-8", b'{"prompt": "\xff\xfe"}', 400, "malformed_json", None),
        ("an array", b'["a cup"]', 422, "invalid_request", None),
        ("no prompt", b"{}", 422, "invalid_request", None),
        ("prompt of the wrong type", b'{"prompt": 5}', 422, "invalid_request", "prompt"),
        ("steps of the wrong type", b'{"prompt": "a", "steps": "many"}', 422, None, "steps"),
        ("NaN", b'{"prompt": "a", "guidance_scale": NaN}', 422, None, "guidance_scale"),
        ("unknown schema", b'{"schema": "genseg.video/v1", "prompt": "a"}', 422,
         "unknown_schema", None),
        ("too many targets", json.dumps(tiny_body(targets=[f"t{i}" for i in range(11)])).encode(),
         422, "invalid_request", "targets"),
        ("a size not a multiple of 8", b'{"prompt": "a", "width": 100}', 422, None, "width"),
        ("an id with a slash", b'{"prompt": "a", "id": "../etc"}', 422, None, "id"),
        ("an oversized body", big, 413, "body_too_large", None),
        ("an ftp callback", b'{"prompt": "a", "callback_url": "ftp://example.com/x"}', 422,
         None, "callback_url"),
    ]  # fmt: skip
    for url in HOSTILE_CALLBACKS:
        body = json.dumps(tiny_body(callback_url=url)).encode()
        cases.append((f"callback {url}", body, 422, "callback_url_refused", None))
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize(("raw", "status", "error", "field"), _bad_bodies())
async def test_bad_input_is_a_json_4xx_and_nothing_is_published(
    client: httpx.AsyncClient,
    api_settings: Settings,
    raw: bytes,
    status: int,
    error: str | None,
    field: str | None,
) -> None:
    response = await client.post(
        "/v1/requests", content=raw, headers={"content-type": "application/json"}
    )
    body = assert_json_error(response, status, error)
    if field is not None:
        assert any(d["loc"][:1] == [field] for d in body["details"]), body
    assert await topic_size(api_settings, "prompts") == 0
    assert (await client.get("/healthz")).status_code == 200


async def test_a_chunked_oversized_body_is_refused_as_it_arrives(
    client: httpx.AsyncClient, api_settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        yield b'{"prompt": "a", "pad": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}'

    response = await client.post("/v1/requests", content=chunks())
    assert_json_error(response, 413, "body_too_large")
    assert await topic_size(api_settings, "prompts") == 0


@pytest.mark.parametrize("query", ["wait=301", "wait=-1", "wait=soon"])
async def test_a_bad_wait_is_a_json_422(
    client: httpx.AsyncClient, api_settings: Settings, query: str
) -> None:
    response = await client.post(f"/v1/requests?{query}", json=tiny_body())
    body = assert_json_error(response, 422, "invalid_parameters")
    assert body["details"][0]["loc"] == ["query", "wait"]
    assert await topic_size(api_settings, "prompts") == 0


async def test_unknown_ids_routes_and_methods_are_json_errors(client: httpx.AsyncClient) -> None:
    assert_json_error(await client.get("/v1/requests/no-such-id"), 404, "not_found")
    assert_json_error(await client.get("/v1/requests/no-such-id/events"), 404, "not_found")
    assert_json_error(await client.get("/v1/blobs/no-such-id/0/gen/image.png"), 404, "not_found")
    assert_json_error(await client.get("/v2/nothing"), 404)
    assert_json_error(await client.delete("/v1/requests/no-such-id"), 404, "not_found")
    assert_json_error(await client.put("/v1/requests/x"), 405)


async def raw_get(url: str, target: str) -> tuple[int, dict[str, Any]]:
    """A GET with the request target exactly as given (httpx would resolve '..')."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/blobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/blobs/%2E%2E/%2E%2E/etc/passwd",
        "/v1/blobs/a/0/../../../secret.txt",
        "/v1/blobs//etc/passwd",
        "/v1/blobs/a/./b",
        "/v1/blobs/a%00b",
        "/v1/blobs/a%5C..%5Cb",
    ],
)
async def test_traversal_in_blob_keys_is_refused(client: httpx.AsyncClient, target: str) -> None:
    status, body = await raw_get(str(client.base_url), target)
    assert status in (400, 404), body
    assert body["error"] in ("unsafe_key", "not_found"), body


async def test_a_file_in_the_store_that_no_event_names_is_not_served(
    client: httpx.AsyncClient, api_settings: Settings
) -> None:
    (Path(api_settings.blob_url) / "loose").mkdir(exist_ok=True)
    (Path(api_settings.blob_url) / "loose" / "secret.txt").write_text("not for you")
    assert_json_error(await client.get("/v1/blobs/loose/secret.txt"), 404, "not_found")


# --- submit -------------------------------------------------------------------------------


async def test_post_is_idempotent_and_reads_its_own_writes(
    client: httpx.AsyncClient, api_settings: Settings
) -> None:
    before = await topic_size(api_settings, "prompts")
    first = await client.post("/v1/requests", json=tiny_body(id="idem-1"))
    assert first.status_code == 202, first.text
    accepted = first.json()
    assert accepted["id"] == "idem-1" and accepted["status"] == "queued"
    assert accepted["status_url"].endswith("/v1/requests/idem-1")
    assert accepted["events_url"].endswith("/v1/requests/idem-1/events")
    # Read-your-writes: known at once, before the view has read the topic back.
    status = (await client.get(accepted["status_url"])).json()
    assert status["status"] == "queued" and status["prompt"] == tiny_body()["prompt"]
    assert status["width"] == 64 and status["targets"] == ["circle"]

    again = await client.post("/v1/requests", json=tiny_body(id="idem-1", prompt="other"))
    assert again.status_code == 200, again.text
    assert again.json()["id"] == "idem-1" and again.json()["prompt"] == tiny_body()["prompt"]
    assert await topic_size(api_settings, "prompts") == before + 1

    # Without an id, each POST is a new request with a fresh id.
    ids = {(await client.post("/v1/requests", json=tiny_body())).json()["id"] for _ in range(2)}
    assert len(ids) == 2
    assert await topic_size(api_settings, "prompts") == before + 3


async def test_the_size_defaults_to_the_profile_like_genseg_submit(
    client: httpx.AsyncClient,
) -> None:
    accepted = (await client.post("/v1/requests", json={"prompt": "a cup"})).json()
    status = (await client.get(accepted["status_url"])).json()
    assert (status["width"], status["height"]) == (512, 512)  # tiny: the contract's default


async def test_wait_answers_with_the_status_when_time_is_up(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await client.post("/v1/requests?wait=0.5", json=tiny_body())
    assert time.monotonic() - started >= 0.5
    assert response.status_code == 202, response.text  # no workers here: still queued
    body = response.json()
    assert body["status"] == "queued" and body["images"][0]["status"] == "queued"


# --- operations --------------------------------------------------------------------------


async def test_health_ready_metrics_and_docs(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await eventually_ok(client, "/readyz")
    assert ready == {"status": "ready", "broker": "ok", "view": "caught_up"}

    await client.get("/v1/requests/no-such-id")
    metrics = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    key = (
        "genseg_gateway_http_requests_total",
        (("method", "GET"), ("route", "/v1/requests/{request_id}"), ("status", "404")),
    )
    assert samples[key] >= 1
    assert any(name == "genseg_gateway_requests_refused_total" for name, _ in samples)

    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = (await client.get("/openapi.json")).json()
    expected = {"/v1/requests", "/v1/requests/{request_id}", "/v1/requests/{request_id}/events",
                "/v1/blobs/{key}", "/v1/queue", "/healthz", "/readyz", "/metrics"}  # fmt: skip
    assert expected <= set(spec["paths"])
    assert {"PromptEvent", "InpaintEvent"} <= set(spec["components"]["schemas"])


async def test_queue_counts_lag_and_queued_requests(client: httpx.AsyncClient) -> None:
    await client.post("/v1/requests", json=tiny_body())
    deadline = time.monotonic() + 30
    while True:
        queue = (await client.get("/v1/queue")).json()
        gen = next(s for s in queue["stages"] if s["stage"] == "gen")
        posted = queue["requests"]["queued"]
        if gen["lag"] is not None and gen["lag"] >= posted > 0:
            break
        assert time.monotonic() < deadline, queue
        await asyncio.sleep(0.2)
    assert gen["group"].endswith(".gen") and gen["members"] == []  # no worker runs here
    assert queue["requests"]["running"] == 0
    assert {s["stage"] for s in queue["stages"]} >= {"gen", "seg"}


# --- auth --------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed(
    api_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    folder = tmp_path_factory.mktemp("keys")
    keys = folder / "keys.toml"
    keys.write_text("[keys]\n" + "".join(f'"{k}" = "{t}"\n' for k, t in KEYS.items()))
    settings = api_settings.model_copy(update={"api_keys": str(keys)})
    async with gateway(settings, folder / "view.sqlite3") as (_gw, http):
        yield http


def bearer(tenant: str) -> dict[str, str]:
    key = next(k for k, t in KEYS.items() if t == tenant)
    return {"Authorization": f"Bearer {key}"}


async def test_with_api_keys_every_v1_call_needs_a_key(
    keyed: httpx.AsyncClient, api_settings: Settings
) -> None:
    before = await topic_size(api_settings, "prompts")
    for headers in ({}, {"Authorization": "Bearer not-a-key-at-all-0000"}, {"Authorization": "x"}):
        response = await keyed.post("/v1/requests", json=tiny_body(), headers=headers)
        assert_json_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_json_error(await keyed.get("/v1/queue", headers=headers), 401)
    assert await topic_size(api_settings, "prompts") == before
    # The gallery and operations stay open (they hold no tenant's data).
    for path in ("/", "/healthz", "/metrics"):
        assert (await keyed.get(path)).status_code == 200


async def test_a_request_carries_its_keys_tenant_and_no_other(
    keyed: httpx.AsyncClient, api_settings: Settings
) -> None:
    before = await topic_size(api_settings, "prompts")
    refused = await keyed.post(
        "/v1/requests", json=tiny_body(tenant="globex"), headers=bearer("acme")
    )
    assert_json_error(refused, 403, "tenant_mismatch")
    assert await topic_size(api_settings, "prompts") == before

    ok = await keyed.post("/v1/requests", json=tiny_body(id="acme-1"), headers=bearer("acme"))
    assert ok.status_code == 202, ok.text
    status = (await keyed.get("/v1/requests/acme-1", headers=bearer("acme"))).json()
    assert status["tenant"] == "acme"

    # Another tenant: the request does not exist for it, and its id is not free either.
    assert_json_error(await keyed.get("/v1/requests/acme-1", headers=bearer("globex")), 404)
    events = await keyed.get("/v1/requests/acme-1/events", headers=bearer("globex"))
    assert_json_error(events, 404)
    listed = (await keyed.get("/v1/requests", headers=bearer("globex"))).json()["requests"]
    assert "acme-1" not in {r["id"] for r in listed}
    taken = await keyed.post("/v1/requests", json=tiny_body(id="acme-1"), headers=bearer("globex"))
    assert_json_error(taken, 409, "id_taken")
    mine = (await keyed.get("/v1/requests", headers=bearer("acme"))).json()["requests"]
    assert "acme-1" in {r["id"] for r in mine}
    assert await topic_size(api_settings, "prompts") == before + 1


async def test_an_open_gateway_warns_unless_on_loopback(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(api_keys=None)
    with caplog.at_level(logging.WARNING, logger="genseg.gateway.server"):
        for host in ("127.0.0.1", "::1", "localhost"):
            warn_if_open(settings, host)
        assert not caplog.records
        warn_if_open(settings, "0.0.0.0")
        assert "without GENSEG_API_KEYS" in caplog.text
        caplog.clear()
        warn_if_open(settings.model_copy(update={"api_keys": "keys.toml"}), "0.0.0.0")
        assert not caplog.records


async def test_a_gateway_without_a_broker_does_not_start(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", blob_url=str(tmp_path / "b")
    )
    gateway_ = Gateway(settings, port=0, config=GatewayConfig(db_path=tmp_path / "v.db"))
    with pytest.raises(GatewayStartError):
        await gateway_.start()


async def test_a_bad_keys_file_stops_the_gateway_from_starting(
    api_settings: Settings, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    bad = ["not toml [", '[keys]\n"short" = "acme"\n', '[keys]\n"k-0123456789abcdef" = "a b"\n']
    for text in bad:
        keys.write_text(text)
        settings = api_settings.model_copy(update={"api_keys": str(keys)})
        with pytest.raises(GatewayStartError, match=r"keys\.toml"):
            Gateway(settings, port=0, config=GatewayConfig(db_path=tmp_path / "v.db"))
