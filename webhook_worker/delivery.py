"""One webhook POST: to an address the policy checked, bounded in time and size.

:func:`deliver` resolves the callback URL through :class:`~webhook_worker.targets.WebhookPolicy`
(every address checked), connects to a checked address itself (so DNS cannot answer
differently between check and connection), and speaks HTTP/1.1 with :mod:`http.client`
over that socket: ``Host`` is the URL's host, and for https the certificate is verified
against that host name (SNI). Redirects are never followed; at most
``Limits.max_response_bytes`` of the answer are read.

Outcomes, by what retrying can change:

- 2xx: delivered; :func:`deliver` returns the status;
- the policy refuses the destination: :class:`~webhook_worker.targets.WebhookRefused`
  (not retried; the stage records it as ``refused``);
- timeouts (:class:`WebhookTimeout`), connection and TLS errors, a host that does not
  resolve, 5xx, 408, 425 and 429 (:class:`WebhookUnavailable`): transient, retried;
- 3xx and every other 4xx (:class:`WebhookRejected`): the receiver refuses the request
  as sent; retrying the same bytes cannot change that, so the runtime dead-letters it
  at once.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from plumbing.errors import PermanentError, TransientError
from webhook_worker.targets import Destination, Unresolvable, WebhookPolicy

log = logging.getLogger(__name__)

USER_AGENT = "genseg-webhook/1"
#: Statuses that say "try again later" although they are not 5xx.
_RETRY_STATUSES = frozenset({408, 425, 429})
#: At most this many of a host's addresses are tried in one attempt.
_MAX_ADDRESSES = 3


@dataclass(frozen=True)
class Limits:
    """Bounds of one delivery attempt. Seconds; bytes."""

    #: Per address tried (at most three addresses per attempt).
    connect_timeout_s: float = 5.0
    #: From connected to the last byte of the answer read: sending the body, the
    #: receiver's work, the status line and headers. Enforced as a whole, not per read.
    response_timeout_s: float = 10.0
    #: Of the answer's body; the rest is never read (the connection is closed).
    max_response_bytes: int = 1024


class WebhookTimeout(TransientError):
    """Connecting or the answer took longer than :class:`Limits` allow."""

    error_type = "webhook_timeout"


class WebhookUnavailable(TransientError):
    """No answer (connection, TLS, DNS) or an answer that says try later (5xx, 429...)."""

    error_type = "webhook_unavailable"

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class WebhookRejected(PermanentError):
    """The receiver refused the request (a 4xx, or a redirect: never followed)."""

    error_type = "webhook_rejected"

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


def deliver(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    policy: WebhookPolicy,
    limits: Limits | None = None,
    tls: ssl.SSLContext | None = None,
) -> int:
    """POST ``body`` to ``url`` with ``headers`` (plus Host, Content-Length, User-Agent);
    the 2xx status on success. ``tls``: the https context (default: the system's CAs).
    Raises as the module docstring says."""
    limits = limits or Limits()
    try:
        dest = policy.resolve(url)
    except Unresolvable as exc:  # DNS may answer later: retried, then dead-lettered
        raise WebhookUnavailable(str(exc)) from None
    status, excerpt = _post(dest, body, headers, limits, tls)
    return _classify(dest, status, excerpt)


def _classify(dest: Destination, status: int, excerpt: bytes) -> int:
    if 200 <= status < 300:
        return status
    said = excerpt.decode("utf-8", "replace").strip()[:200]
    answer = f"{dest.host} answered {status}" + (f": {said}" if said else "")
    if status >= 500 or status in _RETRY_STATUSES:
        raise WebhookUnavailable(answer, status)
    if 300 <= status < 400:
        raise WebhookRejected(f"{answer} (redirects are not followed)", status)
    raise WebhookRejected(answer, status)


def _post(
    dest: Destination,
    body: bytes,
    headers: Mapping[str, str],
    limits: Limits,
    tls: ssl.SSLContext | None,
) -> tuple[int, bytes]:
    """Send the request; the answer's status and the first bytes of its body."""
    sock = _connect(dest, limits.connect_timeout_s)
    try:
        with _deadline(sock, limits.response_timeout_s) as expired:
            try:
                if dest.scheme == "https":
                    context = tls or _system_tls()
                    sock = context.wrap_socket(sock, server_hostname=dest.server_name)
                conn = http.client.HTTPConnection(dest.host, dest.port)
                conn.sock = sock  # already connected: http.client must not connect again
                conn.putrequest("POST", dest.path, skip_host=True, skip_accept_encoding=True)
                request_headers = {
                    "Host": dest.host_header,
                    "User-Agent": USER_AGENT,
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                    "Connection": "close",
                    **headers,
                }
                for name, value in request_headers.items():
                    conn.putheader(name, value)
                conn.endheaders(body)
                response = conn.getresponse()
                try:
                    excerpt = response.read(limits.max_response_bytes)
                finally:
                    response.close()
                if expired.is_set():  # cut short: EOF ends headers for http.client
                    raise TimeoutError
                return response.status, excerpt
            except (OSError, http.client.HTTPException) as exc:
                if expired.is_set() or isinstance(exc, TimeoutError):
                    raise WebhookTimeout(
                        f"{dest.host} did not answer within {limits.response_timeout_s:g} s"
                    ) from None
                raise WebhookUnavailable(f"{dest.host}: {_describe(exc)}") from None
    finally:
        sock.close()


@functools.cache
def _system_tls() -> ssl.SSLContext:
    """The default https context (system CAs, host names checked), built once: loading
    the CA bundle costs more than a delivery on loopback."""
    return ssl.create_default_context()


def _connect(dest: Destination, timeout_s: float) -> socket.socket:
    """A socket connected to the first checked address that answers."""
    last: Exception | None = None
    for address in (dest.addresses or (dest.address,))[:_MAX_ADDRESSES]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect((address, dest.port))
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            log.debug("webhook: %s (%s) port %d: %s", dest.host, address, dest.port, exc)
    shown = f"{dest.host} port {dest.port}"
    if isinstance(last, TimeoutError):
        raise WebhookTimeout(f"connecting to {shown} took over {timeout_s:g} s")
    raise WebhookUnavailable(f"cannot connect to {shown}: {_describe(last)}")


@contextmanager
def _deadline(sock: socket.socket, seconds: float) -> Iterator[threading.Event]:
    """Bound everything done on ``sock`` inside the block to ``seconds`` in all: each
    blocking call times out after ``seconds``, and when the time is up the connection is
    shut down (through a duplicate of its descriptor, which a TLS wrapper does not own),
    so a receiver that drips its answer byte by byte cannot hold a worker. The event
    yielded is set when the deadline struck."""
    sock.settimeout(seconds)
    expired = threading.Event()
    handle = socket.socket(fileno=os.dup(sock.fileno()))

    def strike() -> None:
        expired.set()
        try:
            handle.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the peer
            pass

    timer = threading.Timer(seconds, strike)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()
        handle.close()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no address"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message or exc}"
    return f"{type(exc).__name__}: {exc}"[:300]
