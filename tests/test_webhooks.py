"""Webhook signatures, delivery ids and single deliveries against real HTTP receivers.

The receivers are real servers on loopback addresses (tests/webhook_receiver.py); the
policy allows only what each test names, so a broken check could reach nothing but
loopback. The dispatcher stage on a real broker is in test_webhook_dispatcher.py.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rel_utils import TlsFiles, make_certificates
from tests.webhook_receiver import Answer, NoNetwork, Received, Receiver
from webhook_worker.delivery import (
    Limits,
    WebhookRejected,
    WebhookTimeout,
    WebhookUnavailable,
    deliver,
)
from webhook_worker.signing import DELIVERY_HEADER, SIGNATURE_HEADER, delivery_id, sign, verify
from webhook_worker.targets import WebhookPolicy, WebhookRefused

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret-for-tests"
BODY = b'{"schema":"genseg.asset/v1","id":"req-1","image_index":0,"status":"ok"}'
LOOPBACK = WebhookPolicy(["127.0.0.1"])
FAST = Limits(connect_timeout_s=2.0, response_timeout_s=0.5)


def headers(body: bytes = BODY, delivery: str = "d-1") -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(SECRET, body), DELIVERY_HEADER: delivery}


# --- signing -----------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    signature = sign(SECRET, BODY)
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", signature)
    assert verify(SECRET, BODY, signature)
    assert verify(SECRET.encode(), BODY, f"  {signature} ")  # bytes key, stray spaces
    assert not verify(SECRET, BODY + b" ", signature)  # one byte more
    assert not verify("other", BODY, signature)
    assert not verify(SECRET, BODY, signature.upper())
    assert not verify(SECRET, BODY, signature[7:])  # hex without the scheme
    for bad in (None, "", "sha256=", "sha256=zz", "sha256=é" * 10):
        assert not verify(SECRET, BODY, bad)


def test_delivery_id_is_a_stable_uuid_per_outcome() -> None:
    first = delivery_id("req-1", 0)
    assert first == delivery_id("req-1", 0)  # every attempt, every process, every run
    assert uuid.UUID(first).version == 5
    others = {delivery_id("req-1", 1), delivery_id("req-1", None), delivery_id("req-10", 0)}
    assert first not in others and len(others) == 3


def test_the_receiver_snippet_in_the_docs_verifies_and_rejects() -> None:
    """docs/webhooks.md's Python snippet, run as a receiver would copy it."""
    text = (REPO / "docs" / "webhooks.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text.split("## Verifying", 1)[1], re.S)
    assert snippet is not None, "docs/webhooks.md has a ```python block under Verifying"
    namespace: dict[str, object] = {}
    exec(compile(snippet.group(1), "docs/webhooks.md", "exec"), namespace)
    check = namespace["verify_genseg_webhook"]
    assert callable(check)
    assert check(SECRET.encode(), BODY, sign(SECRET, BODY)) is True
    assert check(SECRET.encode(), BODY + b"\n", sign(SECRET, BODY)) is False
    assert check(b"wrong", BODY, sign(SECRET, BODY)) is False
    assert check(SECRET.encode(), BODY, None) is False


# --- one delivery --------------------------------------------------------------------------


def test_a_delivery_posts_the_body_signed_with_its_headers() -> None:
    with Receiver() as receiver:
        status = deliver(receiver.url("/hooks/genseg?token=t%2F1"), BODY, headers(), LOOPBACK, FAST)
    assert status == 200
    [got] = receiver.received()
    assert got.body == BODY
    assert got.path == "/hooks/genseg?token=t%2F1"
    h = got.headers
    assert h["content-type"] == "application/json"
    assert h["host"] == f"127.0.0.1:{receiver.port}"
    assert h["user-agent"].startswith("genseg")
    assert h["x-genseg-delivery"] == "d-1"
    assert verify(SECRET, got.body, h["x-genseg-signature"])


def test_any_2xx_is_delivered() -> None:
    with Receiver(lambda r: Answer(status=204, body=b"")) as receiver:
        assert deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST) == 204


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_server_errors_and_throttling_are_retryable(status: int) -> None:
    with Receiver(lambda r: Answer(status=status, body=b"busy")) as receiver:
        with pytest.raises(WebhookUnavailable, match=f"127.0.0.1 answered {status}: busy") as e:
            deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST)
    assert e.value.http_status == status
    assert len(receiver.received()) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422])
def test_other_client_errors_are_permanent(status: int) -> None:
    with Receiver(lambda r: Answer(status=status, body=b"no such hook")) as receiver:
        with pytest.raises(WebhookRejected, match=f"answered {status}: no such hook") as e:
            deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST)
    assert e.value.http_status == status
    assert e.value.error_type == "webhook_rejected"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(status: int) -> None:
    with Receiver() as target:
        moved = Answer(status=status, headers={"Location": target.url("/elsewhere")}, body=b"")
        with Receiver(lambda r: moved) as receiver:
            with pytest.raises(WebhookRejected, match="redirects are not followed"):
                deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST)
        assert len(receiver.received()) == 1
    assert target.connections == 0 and target.received() == []


def test_a_long_answer_is_cut_not_read() -> None:
    huge = b"x" * 5_000_000
    with Receiver(lambda r: Answer(status=400, body=huge)) as receiver:
        started = time.monotonic()
        with pytest.raises(WebhookRejected) as e:
            deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST)
    assert len(str(e.value)) < 300
    assert time.monotonic() - started < 5


def test_a_receiver_that_does_not_answer_in_time_is_a_timeout() -> None:
    release = threading.Event()
    with Receiver(lambda r: Answer(hold=release)) as receiver:
        started = time.monotonic()
        try:
            with pytest.raises(WebhookTimeout, match=r"did not answer within 0\.5 s"):
                deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST)
        finally:
            release.set()
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3.0, elapsed
    assert WebhookTimeout.error_type == "webhook_timeout"


@pytest.fixture
def dripping_server() -> Iterator[int]:
    """A raw server on 127.0.0.1 that answers a status line, then one header byte every
    50 ms, forever: each read succeeds, so only a deadline on the whole answer ends it."""
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not stop.wait(0.05):
                    conn.sendall(b"a")
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    thread.join(5)


def test_an_answer_dripped_byte_by_byte_is_cut_at_the_deadline(dripping_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(WebhookTimeout):
        deliver(f"http://127.0.0.1:{dripping_server}/", BODY, headers(), LOOPBACK, FAST)
    assert time.monotonic() - started < 3.0


def test_nothing_listening_is_retryable() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(WebhookUnavailable, match=f"cannot connect to 127.0.0.1 port {port}"):
            deliver(f"http://127.0.0.1:{port}/", BODY, headers(), LOOPBACK, FAST)


# --- refusal at delivery: loopback outside the allow list ---------------------------------


@pytest.mark.parametrize(
    ("listen", "allow", "url_host", "reason"),
    [
        ("127.0.0.1", "", None, "127.0.0.1 is a loopback address"),
        ("127.0.0.2", "127.0.0.1", None, "127.0.0.2 is a loopback address"),
        ("::1", "127.0.0.1", None, "::1 is a loopback address"),
        ("127.0.0.1", "127.0.0.1", "localhost", "localhost is an internal name"),
        ("127.0.0.1", "127.0.0.0/8", "localhost", "localhost is an internal name"),
    ],
)
def test_refused_destinations_get_no_connection(
    listen: str, allow: str, url_host: str | None, reason: str
) -> None:
    policy = WebhookPolicy.from_setting(allow)
    with Receiver(host=listen) as receiver, NoNetwork() as guard:
        url = receiver.url("/hook", host=url_host)
        with pytest.raises(WebhookRefused, match=re.escape(reason)):
            deliver(url, BODY, headers(), policy, FAST)
    assert guard.attempts == []  # refused before any lookup or connection
    assert receiver.connections == 0 and receiver.received() == []


def test_allowed_loopback_names_and_ipv6_are_delivered() -> None:
    with Receiver(host="::1") as receiver:
        status = deliver(receiver.url(), BODY, headers(), WebhookPolicy(["::1"]), FAST)
    assert status == 200
    assert receiver.received()[0].headers["host"] == f"[::1]:{receiver.port}"
    with Receiver() as receiver:  # localhost resolves through /etc/hosts
        url = receiver.url("/cb", host="localhost")
        assert deliver(url, BODY, headers(), WebhookPolicy(["localhost"]), FAST) == 200
    assert receiver.received()[0].headers["host"] == f"localhost:{receiver.port}"


# --- https ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"), hosts=("127.0.0.1",))


def test_https_verifies_the_certificate_against_the_url_host(certificates: TlsFiles) -> None:
    tls = certificates
    trusted = ssl.create_default_context(cafile=str(tls.ca))
    other = ssl.create_default_context(cafile=str(tls.other_ca))
    pair = (tls.cert, tls.key)
    policy = WebhookPolicy(["127.0.0.1", "localhost"])
    with Receiver(tls=pair) as receiver:
        assert deliver(receiver.url(), BODY, headers(), policy, FAST, tls=trusted) == 200
        assert verify(SECRET, receiver.received()[0].body, headers()[SIGNATURE_HEADER])
        # A certificate from a CA the dispatcher does not trust: not delivered.
        with pytest.raises(WebhookUnavailable, match="TLS certificate not accepted"):
            deliver(receiver.url(), BODY, headers(), policy, FAST, tls=other)
        # Same address, another name: the certificate names 127.0.0.1 only.
        with pytest.raises(WebhookUnavailable, match="TLS certificate not accepted"):
            url = receiver.url("/", host="localhost")
            deliver(url, BODY, headers(), policy, FAST, tls=trusted)
    assert len(receiver.received()) == 1


def test_received_record_is_json_of_the_body() -> None:
    """What a receiver does first: check the signature, then parse (a sanity check of
    the receiver helper itself: it hands over the raw bytes)."""
    recorded: list[Received] = []

    def answer(request: Received) -> Answer:
        recorded.append(request)
        ok = verify(SECRET, request.body, request.headers.get("x-genseg-signature"))
        return Answer(status=204 if ok else 401)

    with Receiver(answer) as receiver:
        deliver(receiver.url(), BODY, headers(), LOOPBACK, FAST)
        with pytest.raises(WebhookRejected, match="401"):
            deliver(receiver.url(), BODY, {**headers(), SIGNATURE_HEADER: "sha256=0"}, LOOPBACK)
    assert json.loads(recorded[0].body)["id"] == "req-1"
