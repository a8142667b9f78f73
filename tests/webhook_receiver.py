"""A real webhook receiver for the tests: an HTTP server on a loopback address, in a thread.

Every whole request is recorded (path, headers, body, the status answered); ``answer`` decides
the reply per request (status, headers, body, and an optional hold: the reply waits on
a threading.Event, bounded). Accepted TCP connections are counted too, so a test can
show that nothing at all reached the receiver. Optional TLS (``tls=(cert, key)``).
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    answered: int | None = None  # the status sent back; None while held or unanswered


@dataclass
class Answer:
    """How to reply: ``hold`` (if set) is waited on, at most ``hold_s``, before replying."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    hold: threading.Event | None = None
    hold_s: float = 30.0


def ok(_: Received) -> Answer:
    return Answer()


class Receiver:
    """``with Receiver() as r: r.url("/hook")``; ``r.requests`` holds what arrived."""

    def __init__(
        self,
        answer: Callable[[Received], Answer] = ok,
        host: str = "127.0.0.1",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.answer = answer
        self.host = host
        self.tls = tls
        self.requests: list[Received] = []
        self.connections = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- what arrived ---

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def answered(self, status_range: range = range(200, 300)) -> list[Received]:
        """Requests answered with a status in ``status_range`` (default: 2xx)."""
        return [r for r in self.received() if r.answered in status_range]

    # --- life ---

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        shown = host or (f"[{self.host}]" if ":" in self.host else self.host)
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{shown}:{self.port}{path}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def __enter__(self) -> Receiver:
        receiver = self
        tls: ssl.SSLContext | None = None
        if self.tls is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(*self.tls)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender died between its headers and its body (a SIGKILL test):
                    # a torn request, which no server hands on as one.
                    self.close_connection = True
                    return
                request = Received(
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                with receiver.lock:
                    receiver.requests.append(request)
                answer = receiver.answer(request)
                if answer.hold is not None:
                    answer.hold.wait(answer.hold_s)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(answer.body)
                    self.wfile.flush()
                except OSError:  # the client left (killed, or timed out)
                    return
                request.answered = answer.status
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                conn, addr = super().get_request()
                with receiver.lock:
                    receiver.connections += 1
                if tls is not None:  # the handshake happens in the handler's thread
                    conn = tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                return conn, addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that went away (or failed TLS) is part of the tests

        self._server = Server((self.host, 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# --- proving that no network traffic happens -----------------------------------------------

_NETWORK_EVENTS = frozenset(
    {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
     "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg"}
)  # fmt: skip
_guard = threading.local()
_hook_installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    attempts = getattr(_guard, "attempts", None)
    if attempts is not None and event in _NETWORK_EVENTS:
        attempts.append((event, args))
        raise PermissionError(f"network traffic in a no-network block: {event} {args!r}")


class NoNetwork:
    """``with NoNetwork() as guard:`` any DNS lookup, connect or send made by this thread
    inside the block raises PermissionError and is recorded in ``guard.attempts``.

    A socket-level guard (Python's audit hooks, the events every socket call raises), not
    a stub of our code: it sees what the standard library is asked to do.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[str, tuple[Any, ...]]] = []

    def __enter__(self) -> NoNetwork:
        global _hook_installed
        if not _hook_installed:  # audit hooks cannot be removed: one, switched per thread
            sys.addaudithook(_audit)
            _hook_installed = True
        _guard.attempts = self.attempts
        return self

    def __exit__(self, *exc: object) -> None:
        _guard.attempts = None
