"""Everything one gateway holds while it runs: the view and its feeder, the publisher,
the blob store, the keys, the webhook policy and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from genseg.gateway.auth import OPEN, ApiKeys, Caller, bearer_token
from genseg.gateway.errors import ApiError
from genseg.gateway.feeder import Feeder, Hub
from genseg.gateway.metrics import GatewayMetrics
from genseg.gateway.queue import QueueReader
from genseg.gateway.status import Links
from genseg.gateway.submit import MAX_BODY_BYTES
from genseg.gateway.view import View
from genseg.profiles import request_size
from plumbing.blobstore import BlobStore, ForeignBlobRef
from plumbing.settings import Settings
from producers.publisher import Publisher
from webhook_worker.targets import WebhookPolicy

log = logging.getLogger(__name__)

#: The view's file when none is given: in the working directory, like the blob store's.
DEFAULT_DB = Path("genseg-gateway.sqlite3")
TERMINAL_STATES = ("done", "failed")


@dataclass
class GatewayConfig:
    """How one gateway runs (the settings say where the broker and the blobs are)."""

    db_path: Path = DEFAULT_DB
    max_body_bytes: int = MAX_BODY_BYTES
    #: A comment line on idle event streams, so proxies do not close them.
    keepalive_s: float = 15.0
    #: How long a publish may take before the POST answers 503.
    publish_timeout_s: float = 15.0
    #: ``width``/``height`` of a request that gives neither; None: the profile's
    #: native size or the contract's 512, as ``genseg submit`` does.
    default_size: int | None = None


class GatewayState:
    """The parts of one gateway, started and stopped together by the app's lifespan."""

    def __init__(self, settings: Settings, config: GatewayConfig) -> None:
        self.settings = settings
        self.config = config
        self.metrics = GatewayMetrics()
        self.blobs = BlobStore.from_settings(settings)
        self.keys = ApiKeys(settings.api_keys) if settings.api_keys else None
        self.policy = WebhookPolicy.from_setting(settings.webhook_allow)
        self.default_size = config.default_size or request_size(settings.models)
        self.hub = Hub()
        self.view: View | None = None
        self.feeder: Feeder | None = None
        self.publisher: Publisher | None = None
        self.queue: QueueReader | None = None
        #: Why :meth:`start` failed, for the server that reports it.
        self.start_error: Exception | None = None

    def blob_key(self, uri: str) -> str | None:
        """The key of a reference inside the gateway's store, or None."""
        try:
            return self.blobs.key_of(uri)
        except ForeignBlobRef:
            return None

    async def start(self) -> None:
        identity = f"{self.settings.kafka_bootstrap_servers}|{self.settings.topic_prefix}"
        self.view = View(self.config.db_path, identity=identity)
        try:
            self.publisher = Publisher(self.settings)
            await self.publisher.start()
            self.feeder = Feeder(self.settings, self.view, self.hub, self.blob_key, self.metrics)
            await self.feeder.start()
            self.queue = QueueReader(self.settings, self.feeder.consumer, self.view)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for part in (self.queue, self.feeder, self.publisher):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        if self.view is not None:
            self.view.close()
        self.view = self.feeder = self.publisher = self.queue = None

    def the_view(self) -> View:
        if self.view is None:
            raise ApiError(503, "starting", "the gateway is starting or stopping")
        return self.view

    def links(self, request: Request) -> Links:
        return Links(str(request.base_url), self.blob_key)

    def caller(self, request: Request) -> Caller:
        """Who calls: OPEN without a keys file; else the tenant of the bearer key (401)."""
        if self.keys is None:
            return OPEN
        token = bearer_token(request.headers.get("authorization"))
        tenant = self.keys.tenant_of(token) if token else None
        if tenant is None:
            raise ApiError(
                401, "unauthorized", "an API key is needed: Authorization: Bearer KEY",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        return Caller(tenant=tenant, authenticated=True)

    async def wait_terminal(self, request_id: str, timeout_s: float) -> None:
        """Return when every image of the request is terminal, or after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.hub.watch(request_id) as changes:
            while True:
                row = self.the_view().request(request_id)
                remaining = deadline - loop.time()
                if row is None or row.state in TERMINAL_STATES or remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    if (await asyncio.wait_for(changes.get(), remaining)).closing:
                        return
