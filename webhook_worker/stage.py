"""The webhook dispatcher's stage: terminal events in, one signed POST each, a record out.

Two instances run in one dispatcher process (:func:`dispatcher_stages`), each its own
consumer group: ``webhook-assets`` reads asset-ready events from ``{prefix}.assets``,
``webhook-dlq`` reads dead-letter events from ``{prefix}.dlq``. For each event with a
``callback_url`` (on an asset-ready event; inside a dead letter's ``value``, the original
prompt or image-ready record), the stage POSTs the event's record value, byte for byte
as it is on its topic, signed (:mod:`webhook_worker.signing`), and returns a
:class:`~schemas.WebhookDelivery` for ``{prefix}.webhooks``:

- ``delivered``: the receiver answered 2xx;
- ``refused``: the policy refused the destination (a URL that is not http(s), an internal
  address or name outside ``GENSEG_WEBHOOK_ALLOW``, checked again after DNS); nothing was
  sent, nothing is retried.

Everything else is a failure the runtime handles: transient ones (timeouts, connection
errors, 5xx, 429) are retried on the schedule of :attr:`WebhookStage.runtime_defaults`,
a 4xx or a redirect is not; either way the last failure is a dead-letter event on
``{prefix}.webhooks`` (``dead_letter_topic``), never on the dlq: a delivery that failed
does not end the request a second time. Events without a ``callback_url`` produce nothing.

At-least-once: the input offset is committed after the record is on the webhooks
topic, so a dispatcher killed mid-delivery delivers again; the ``X-Genseg-Delivery`` id
is the same, and the receiver dedupes.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import TypeAdapter, ValidationError

from consumers.stage import ItemResult, Output, Stage, StageContext
from plumbing.settings import Settings
from schemas import AssetReadyEvent, DeadLetterEvent, Event, WebhookDelivery, parse_event
from schemas.events import CallbackUrl, TenantId
from webhook_worker.delivery import Limits, deliver
from webhook_worker.signing import DELIVERY_HEADER, SIGNATURE_HEADER, delivery_id, sign
from webhook_worker.targets import WebhookPolicy, WebhookRefused

log = logging.getLogger(__name__)

OutcomeKind = Literal["asset", "dead_letter"]

_CALLBACK_URL: TypeAdapter[str] = TypeAdapter(CallbackUrl)
_TENANT: TypeAdapter[str] = TypeAdapter(TenantId)

#: Retries: attempt n+1 waits min(1 s * 2**(n-1), 60 s): 1, 2, 4, 8, 16, 32, 60, 60, 60,
#: 60 s, i.e. 10 retries over about 5 minutes (303 s of waiting), then a dead letter.
WEBHOOK_RUNTIME_DEFAULTS: dict[str, Any] = {
    "concurrency": 8,  # one slow receiver holds one slot, not the dispatcher
    "max_attempts": 11,
    "backoff_initial_ms": 1_000,
    "backoff_max_ms": 60_000,
    "job_timeout_s": 60.0,  # a delivery is bounded by Limits (at most 25 s) well before
}


class Outcome(Event):
    """One terminal event to deliver: what the handler needs of it and its record value.

    Not a record of any topic: the stage's parsed input (``parse``)."""

    kind: OutcomeKind
    id: str | None = None
    image_index: int | None = None
    tenant: str | None = None
    #: As found on the event; None: nothing to deliver.
    callback_url: str | None = None
    #: ``X-Genseg-Delivery``: derived from the outcome, the same on every attempt.
    delivery: str
    #: The request body: the event's record value exactly as read from its topic.
    body: bytes


def require_secret(settings: Settings) -> bytes:
    """``GENSEG_WEBHOOK_SECRET`` as bytes; ValueError when it is missing or empty."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if not secret:
        raise ValueError(
            "GENSEG_WEBHOOK_SECRET is not set: the webhook dispatcher signs every delivery "
            "(X-Genseg-Signature) and does not start without a secret"
        )
    return secret.encode("utf-8")


def _tenant(value: object) -> str | None:
    try:
        return _TENANT.validate_python(value) if isinstance(value, str) else None
    except ValidationError:
        return None


def _callback_in(value: str) -> str | None:
    """The ``callback_url`` of a dead letter's original record (JSON text), if any."""
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):  # unparsable or truncated: nothing to find
        return None
    url = data.get("callback_url") if isinstance(data, dict) else None
    return url if isinstance(url, str) else None


class WebhookStage(Stage[Outcome]):
    """POSTs each terminal outcome to its ``callback_url`` (see the module docstring).

    ``outcome``: which terminal events, ``"asset"`` (the assets topic) or
    ``"dead_letter"`` (the dlq). ``limits`` bound each attempt; ``tls`` is the https
    context (default: the system's certificate authorities).
    """

    dead_letter_topic: ClassVar[str] = "webhooks"
    per_image = True
    runtime_defaults: ClassVar[dict[str, Any]] = WEBHOOK_RUNTIME_DEFAULTS

    def __init__(
        self,
        settings: Settings,
        outcome: OutcomeKind = "asset",
        *,
        limits: Limits | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if outcome not in ("asset", "dead_letter"):
            raise ValueError(f"outcome must be 'asset' or 'dead_letter', not {outcome!r}")
        self.settings = settings
        self.outcome: OutcomeKind = outcome
        self.name = "webhook-assets" if outcome == "asset" else "webhook-dlq"
        self.input_topic = "assets" if outcome == "asset" else "dlq"
        self.policy = WebhookPolicy.from_setting(settings.webhook_allow)
        self.limits = limits or Limits()
        self.tls = tls
        self._secret: bytes | None = None

    def setup(self) -> None:
        """Refuse to run without ``GENSEG_WEBHOOK_SECRET`` (ValueError)."""
        self._secret = require_secret(self.settings)

    # --- parsing -------------------------------------------------------------------------

    def parse(self, raw: bytes) -> Outcome:
        if self.outcome == "asset":
            asset = parse_event(raw, AssetReadyEvent)
            return Outcome(
                kind="asset",
                id=asset.id,
                image_index=asset.image_index,
                tenant=asset.tenant,
                callback_url=asset.callback_url,
                delivery=delivery_id(asset.id, asset.image_index),
                body=raw,
            )
        dead = parse_event(raw, DeadLetterEvent)
        # The dispatcher's own failures go to the webhooks topic; one that reached the
        # dlq anyway must not be delivered (it would announce a second terminal outcome).
        own = dead.stage.startswith("webhook")
        source = dead.source
        key = dead.id or f"@{source.topic}/{source.partition}/{source.offset}"
        return Outcome(
            kind="dead_letter",
            id=dead.id,
            image_index=dead.image_index,
            tenant=_tenant(dead.tenant),
            callback_url=None if own else _callback_in(dead.value),
            delivery=delivery_id(key, dead.image_index),
            body=raw,
        )

    # --- delivery ------------------------------------------------------------------------

    def handle(self, events: list[Outcome], ctx: StageContext) -> list[ItemResult]:
        results: list[ItemResult] = []
        for index, event in enumerate(events):
            try:
                with ctx.phase("deliver", item=index):
                    results.append(self._one(event, ctx))
            except Exception as exc:  # the runtime classifies it: retried, or dead-lettered
                results.append(exc)
        return results

    def _one(self, event: Outcome, ctx: StageContext) -> list[Output]:
        url = event.callback_url
        if url is None:
            return []
        try:
            _CALLBACK_URL.validate_python(url)
        except ValidationError:
            return [self._record(event, ctx, "refused", reason=_NOT_A_CALLBACK_URL)]
        if self._secret is None:  # setup() not called (a handler run without a runtime)
            self.setup()
        assert self._secret is not None
        headers = {
            SIGNATURE_HEADER: sign(self._secret, event.body),
            DELIVERY_HEADER: event.delivery,
        }
        try:
            status = deliver(url, event.body, headers, self.policy, self.limits, self.tls)
        except WebhookRefused as exc:
            log.warning("webhook for %s refused: %s", event.id, exc)
            return [self._record(event, ctx, "refused", reason=str(exc))]
        log.info(
            "webhook %s for %s/%s delivered to %s: %d (attempt %d)",
            event.delivery,
            event.id,
            event.image_index,
            _host(url),
            status,
            ctx.attempt,
        )
        return [self._record(event, ctx, "delivered", http_status=status)]

    def _record(
        self,
        event: Outcome,
        ctx: StageContext,
        status: Literal["delivered", "refused"],
        *,
        http_status: int | None = None,
        reason: str | None = None,
    ) -> Output:
        record = WebhookDelivery(
            id=event.id,
            image_index=event.image_index,
            delivery=event.delivery,
            outcome=event.kind,
            status=status,
            http_status=http_status,
            attempts=max(ctx.attempt, 1),
            host=_host(event.callback_url or ""),
            reason=reason,
            tenant=event.tenant,
        )
        return Output(ctx.topics.webhooks, record, key=event.id or "")


_NOT_A_CALLBACK_URL = "callback_url is not an http or https URL of at most 2048 characters"


def _host(url: str) -> str:
    """The host of ``url`` for records and logs (never its path or query: tokens)."""
    try:
        return (urlsplit(url).hostname or "")[:255]
    except ValueError:
        return ""


def dispatcher_stages(
    settings: Settings, *, limits: Limits | None = None, tls: ssl.SSLContext | None = None
) -> list[WebhookStage]:
    """The stages of one dispatcher process (``genseg worker webhook``): asset-ready and
    dead-letter outcomes, each its own consumer group (``{prefix}.webhook-assets``,
    ``{prefix}.webhook-dlq``). Each refuses to start without ``GENSEG_WEBHOOK_SECRET``."""
    return [
        WebhookStage(settings, "asset", limits=limits, tls=tls),
        WebhookStage(settings, "dead_letter", limits=limits, tls=tls),
    ]
