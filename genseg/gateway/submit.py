"""Turning a POSTed body into a prompt or inpaint event, or a 4xx that says what is wrong.

Nothing here publishes: every check runs before the request reaches the topic.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from genseg.gateway.auth import Caller
from genseg.gateway.errors import ApiError, from_validation
from genseg.gateway.view import View
from producers.client import new_request_id
from schemas import SCHEMA_PROMPT, InpaintEvent, PromptEvent, topic_models
from webhook_worker.targets import WebhookPolicy

#: The largest body accepted: a prompt event is a few KiB; 256 KiB leaves room for
#: explicit boxes and points, and caps what one request can make the gateway hold.
MAX_BODY_BYTES = 256 * 1024


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, or a 413 as soon as it passes ``limit`` bytes."""
    too_large = ApiError(413, "body_too_large", f"the body is larger than {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "the body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(
            422, "invalid_request",
            f"the body must be a JSON object (a prompt event), not {type(data).__name__}",
        )  # fmt: skip
    return data


def parse_submission(
    raw: bytes,
    caller: Caller,
    policy: WebhookPolicy,
    *,
    default_size: int | None = None,
) -> PromptEvent | InpaintEvent:
    """Validate a POSTed body as a prompt or inpaint event.

    ``id`` and ``schema`` may be left out (a fresh id; a prompt event). An authenticated
    caller's tenant is set on the event; naming another tenant is refused (403): a
    silent override would file the request under a tenant the client did not mean.
    ``default_size`` fills ``width`` and ``height`` when neither is given, as ``genseg
    submit`` does (the profile's native size).
    """
    data = _object(raw)
    models = topic_models("prompts")
    schema = data.setdefault("schema", SCHEMA_PROMPT)
    if not isinstance(schema, str) or schema not in models:
        shown = schema[:100] if isinstance(schema, str) else type(schema).__name__
        raise ApiError(
            422, "unknown_schema", f"unknown schema {shown!r}; expected one of {sorted(models)}"
        )
    data.setdefault("id", new_request_id("req"))
    if caller.authenticated:
        if data.get("tenant") not in (None, caller.tenant):
            raise ApiError(
                403, "tenant_mismatch",
                f"this API key submits for tenant {caller.tenant!r}; leave 'tenant' out",
            )  # fmt: skip
        data["tenant"] = caller.tenant
    if default_size is not None and "width" not in data and "height" not in data:
        data["width"] = data["height"] = default_size
    try:
        event = models[schema].model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None
    except (RecursionError, ValueError, TypeError) as exc:  # never crash on input
        raise ApiError(422, "invalid_request", f"invalid event: {str(exc)[:200]}") from None
    assert isinstance(event, PromptEvent | InpaintEvent)  # the prompts topic's models
    if event.callback_url is not None and (reason := policy.refusal(event.callback_url)):
        raise ApiError(422, "callback_url_refused", reason)
    return event


def check_inputs(
    event: PromptEvent | InpaintEvent, caller: Caller, view: View, blob_key: Any
) -> None:
    """An inpaint event's image and mask must be blobs of the store, and for a tenant,
    blobs of its own requests: a known URI must not lend another tenant's pixels."""
    if not isinstance(event, InpaintEvent):
        return
    for name, ref in (("image", event.image), ("mask", event.mask)):
        key = blob_key(ref.uri)
        if key is None:
            raise ApiError(422, "foreign_blob", f"{name} is not a blob of this gateway's store")
        if caller.authenticated:
            found = view.blob(key)
            owner = view.request(found[1]) if found else None
            if owner is None or not caller.may_see(owner.tenant):
                raise ApiError(422, "foreign_blob", f"{name} is not a blob of your requests")
