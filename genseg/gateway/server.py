"""The gateway's application and its HTTP server.

- :func:`create_app`: the FastAPI app of one gateway (its parts start and stop with
  the app's lifespan);
- :class:`Gateway`: that app served by uvicorn inside the caller's event loop, for
  ``genseg up``, the tests and the bench (``port=0`` picks a free port);
- :func:`serve`: ``genseg serve``: a gateway until SIGTERM/SIGINT (or cancellation),
  then a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from consumers.runtime import until_signalled
from genseg.gateway import api, errors, gallery, ops
from genseg.gateway.auth import ApiKeysError
from genseg.gateway.metrics import MetricsMiddleware
from genseg.gateway.state import GatewayConfig, GatewayState
from plumbing.settings import Settings
from schemas import InpaintEvent, PromptEvent

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DESCRIPTION = (
    "Submit prompt events over HTTP, follow them as Server-Sent Events, read their status "
    "and download their images and cut-outs. Errors are JSON: "
    '`{"error": ..., "message": ..., "details": [...]}`. See docs/gateway.md.'
)


class GatewayStartError(RuntimeError):
    """The gateway did not start (the broker is unreachable, the keys file is bad...);
    the cause is chained."""


def create_app(
    settings: Settings, config: GatewayConfig | None = None, *, db_path: str | Path | None = None
) -> FastAPI:
    """The FastAPI app of one gateway: ``config`` (``db_path`` overrides its view file)."""
    config = config or GatewayConfig()
    if db_path is not None:
        config = dataclasses.replace(config, db_path=Path(db_path))
    state = GatewayState(settings, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await state.start()
        except Exception as exc:
            state.start_error = exc
            raise
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="genseg gateway", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.gateway = state
    errors.install(app)
    app.include_router(api.router)
    app.include_router(ops.router)
    app.include_router(gallery.router)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, with the contract's prompt and inpaint events as the schemas
    of the POST body (read by hand, so FastAPI does not know them)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PromptEvent, InpaintEvent):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return build


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling (the caller owns the signals: ``genseg up``
    runs more than a gateway), telling when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:  # uvicorn's answer to a failed lifespan: not for a library
            self.should_exit = True
        finally:
            self.listening.set()


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (0: a free port), made with proto IPPROTO_TCP.

    Not uvicorn's ``bind_socket``: its socket has proto 0, and asyncio sets TCP_NODELAY
    only on connections of an IPPROTO_TCP socket. Without it every response (headers,
    then body: two writes) waits for the client's delayed ACK: 40 ms per request.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Gateway:
    """One gateway serving HTTP on ``host:port`` in the running event loop.

    Usage::

        async with Gateway(settings, port=0) as gateway:
            print(gateway.url)
    """

    def __init__(
        self,
        settings: Settings,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        config: GatewayConfig | None = None,
        log_level: str = "warning",
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        try:
            self.app = create_app(settings, config)
        except (ApiKeysError, ValueError) as exc:  # a bad keys file, an unusable blob URL
            raise GatewayStartError(f"the gateway cannot start: {exc}") from exc
        self.state: GatewayState = self.app.state.gateway
        self._server = _Server(
            uvicorn.Config(
                self.app, host=host, port=port, log_level=log_level, lifespan="on",
                access_log=False, timeout_graceful_shutdown=5, log_config=None,
            )
        )  # fmt: skip
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the gateway."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Start the gateway's parts and listen; :class:`GatewayStartError` if it cannot."""
        warn_if_open(self.settings, self.host)
        sock = bind_tcp(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway")
        listening = asyncio.create_task(self._server.listening.wait())
        await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if not self._server.started:
            sock.close()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            cause = self.state.start_error
            message = f"the gateway on {self.url} did not start: {cause!r}"
            raise GatewayStartError(message) from cause

    async def stop(self) -> None:
        """End open event streams and waits, then shut the server down."""
        task, self._task = self._task, None
        if task is None:
            return
        self.state.hub.close()  # else uvicorn waits on open streams until its timeout
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await task

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def warn_if_open(settings: Settings, host: str) -> None:
    if settings.api_keys is None and not is_loopback(host):
        log.warning(
            "the gateway listens on %s without GENSEG_API_KEYS: anyone who reaches it can "
            "submit requests and read every result (docs/gateway.md, Auth)", host,
        )  # fmt: skip


async def serve(
    settings: Settings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    config: GatewayConfig | None = None,
    handle_signals: bool = True,
    on_ready: Callable[[Gateway], None] | None = None,
) -> None:
    """Run a gateway until SIGTERM or SIGINT (``handle_signals``) or until cancelled,
    then stop it cleanly. ``on_ready`` is called once it listens (e.g. to print its URL)."""
    gateway = Gateway(settings, host, port, config=config)
    await gateway.start()
    log.info("genseg gateway on %s (view %s)", gateway.url, gateway.state.config.db_path)
    if on_ready is not None:
        on_ready(gateway)
    try:
        if handle_signals:
            await until_signalled()
        else:
            await asyncio.Event().wait()  # until cancelled
    finally:
        await gateway.stop()
