"""The ``/v1`` routes: submit, status, events, blobs, queue."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from consumers.deletion import delete_request
from genseg.gateway.auth import Caller
from genseg.gateway.errors import ApiError
from genseg.gateway.models import (
    Accepted,
    Deleted,
    ErrorBody,
    QueueView,
    RequestList,
    RequestStatus,
)
from genseg.gateway.sse import event_stream, last_event_id
from genseg.gateway.state import TERMINAL_STATES, GatewayState
from genseg.gateway.status import request_status
from genseg.gateway.submit import check_inputs, parse_submission, read_body
from plumbing.blobstore import BlobError, BlobIntegrityError, BlobNotFound, sha256_hex

log = logging.getLogger(__name__)

#: The longest ``?wait``: a client that wants longer waits again or follows the events.
MAX_WAIT_S = 300.0
#: Blobs the gateway serves: far above any image, mask or mesh genseg writes.
MAX_BLOB_BYTES = 256 * 1024 * 1024


def gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def caller(request: Request) -> Caller:
    return gateway(request).caller(request)


Gateway = Annotated[GatewayState, Depends(gateway)]
Who = Annotated[Caller, Depends(caller)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)
}
router = APIRouter(prefix="/v1", responses=_ERRORS)


def _submit_schema() -> dict[str, Any]:
    """The POST body in the OpenAPI document: a prompt or an inpaint event (the body is
    read by hand, to answer 413 and malformed JSON as the gateway's own errors)."""
    refs = [{"$ref": "#/components/schemas/PromptEvent"}]
    refs.append({"$ref": "#/components/schemas/InpaintEvent"})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"oneOf": refs}}},
        }
    }


@router.post(
    "/requests",
    status_code=202,
    response_model=Accepted,
    openapi_extra=_submit_schema(),
    summary="Submit a prompt (or inpaint) event",
    responses={200: {"model": RequestStatus, "description": "already accepted, or ?wait"}},
)
async def submit(
    request: Request,
    gw: Gateway,
    who: Who,
    wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_S)] = None,
) -> JSONResponse:
    """Publish the event to the prompts topic (``id`` and ``schema`` may be left out).
    An id already accepted answers that request and publishes nothing. With ``?wait=S``
    the answer comes when every image is terminal (200) or S seconds passed (202)."""
    view = gw.the_view()
    raw = await read_body(request, gw.config.max_body_bytes)
    try:
        event = parse_submission(raw, who, gw.policy, default_size=gw.default_size)
        check_inputs(event, who, view, gw.blob_key)
    except ApiError as exc:
        gw.metrics.refused.labels(exc.error).inc()
        raise
    links = gw.links(request)
    if not view.accept(event, who.tenant if who.authenticated else event.tenant):
        row = view.request(event.id)
        if row is None or not who.may_see(row.tenant):
            raise ApiError(409, "id_taken", f"the id {event.id!r} is taken; choose another")
        return await _answer(gw, event.id, links, wait, accepted_status=200)
    assert gw.publisher is not None
    try:
        await asyncio.wait_for(
            gw.publisher.publish(gw.settings.topics.prompts, event), gw.config.publish_timeout_s
        )
    except (KafkaError, TimeoutError, OSError) as exc:
        view.forget(event.id)
        log.warning("publishing %s failed: %r", event.id, exc)
        raise ApiError(503, "broker_unavailable", "the broker did not take the request") from exc
    gw.metrics.published.inc()
    return await _answer(gw, event.id, links, wait, accepted_status=202)


async def _answer(
    gw: GatewayState, request_id: str, links: Any, wait: float | None, accepted_status: int
) -> JSONResponse:
    if wait:
        await gw.wait_terminal(request_id, wait)
    row = gw.the_view().request(request_id)
    if row is None:  # forgotten meanwhile (its publishing failed): as if never sent
        raise ApiError(404, "not_found", f"no request {request_id!r}")
    if wait is None and accepted_status == 202:
        body = Accepted(
            id=row.id, status=row.state, status_url=links.status(row.id),  # type: ignore[arg-type]
            events_url=links.events(row.id),
        )  # fmt: skip
        return JSONResponse(body.model_dump(), status_code=202)
    status = 200 if row.state in TERMINAL_STATES or wait is None else 202
    return JSONResponse(
        request_status(gw.the_view(), row, links).model_dump(mode="json"), status_code=status
    )


@router.get("/requests", response_model=RequestList, summary="The newest requests")
async def recent(
    request: Request, gw: Gateway, who: Who, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> RequestList:
    """The caller's newest requests, newest first (every request on an open gateway)."""
    view = gw.the_view()
    links = gw.links(request)
    ids = view.recent(who.tenant, limit, any_tenant=not who.authenticated)
    rows = [row for rid in ids if (row := view.request(rid)) is not None]
    return RequestList(requests=[request_status(view, row, links) for row in rows])


def _own_request(gw: GatewayState, who: Caller, request_id: str) -> Any:
    row = gw.the_view().request(request_id)
    # Another tenant's request is answered exactly like a missing one.
    if row is None or not who.may_see(row.tenant):
        raise ApiError(404, "not_found", f"no request {request_id!r}")
    return row


@router.get("/requests/{request_id}", response_model=RequestStatus, summary="A request's status")
async def status(request_id: str, request: Request, gw: Gateway, who: Who) -> RequestStatus:
    row = _own_request(gw, who, request_id)
    return request_status(gw.the_view(), row, gw.links(request))


@router.delete("/requests/{request_id}", response_model=Deleted, summary="Delete a request")
async def delete(request_id: str, gw: Gateway, who: Who) -> Deleted:
    """Every blob of the request is removed and a deletion event published (workers drop
    it, even in flight; every gateway's view forgets it); docs/deploy.md, Deletion."""
    row = _own_request(gw, who, request_id)
    try:
        # ``force``: the view knows it, so even a request still queued (nothing stored
        # yet) is deleted, and its late outputs are removed by the workers' check.
        event = await delete_request(
            gw.settings, request_id, tenant=row.tenant, force=True, blob=gw.blobs,
            publisher=gw.publisher,
        )  # fmt: skip
    except (BlobError, KafkaError) as exc:
        raise ApiError(503, "unavailable", f"the deletion did not finish: {exc}") from exc
    assert event is not None  # forced: never "unknown"
    gw.the_view().erase(request_id)  # read-your-writes; the event tells the other gateways
    return Deleted(id=request_id, blobs_deleted=event.blobs_deleted,
                   bytes_deleted=event.bytes_deleted)  # fmt: skip


@router.get(
    "/requests/{request_id}/events",
    summary="A request's events (Server-Sent Events), from the start",
    responses={200: {"content": {"text/event-stream": {}}}},
    response_class=StreamingResponse,
)
async def events(request_id: str, request: Request, gw: Gateway, who: Who) -> StreamingResponse:
    _own_request(gw, who, request_id)
    after = last_event_id(request.headers.get("last-event-id"))
    return StreamingResponse(
        event_stream(gw, request_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _unsafe(key: str) -> bool:
    parts = key.split("/")
    return any(p in ("", ".", "..") for p in parts) or any(c in key for c in "\\\x00")


def _etag_matches(header: str | None, sha256: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    return "*" in tags or sha256 in tags


@router.get(
    "/blobs/{key:path}",
    summary="The bytes of a blob an event references",
    responses={200: {"content": {"image/png": {}}}, 304: {"description": "not modified"}},
    response_class=Response,
)
async def blob(key: str, request: Request, gw: Gateway, who: Who) -> Response:
    """Only blobs that events of the caller's requests reference; ETag = sha256."""
    if _unsafe(key):
        raise ApiError(400, "unsafe_key", "a blob key has no empty, '.' or '..' segments")
    view = gw.the_view()
    found = view.blob(key)
    owner = view.request(found[1]) if found else None
    if found is None or owner is None or not who.may_see(owner.tenant):
        raise ApiError(404, "not_found", f"no blob {key!r}")
    ref = found[0]
    if _etag_matches(request.headers.get("if-none-match"), ref.sha256):
        return Response(status_code=304, headers={"ETag": f'"{ref.sha256}"'})
    try:
        data = await asyncio.to_thread(gw.blobs.get, ref)
    except BlobIntegrityError:
        # A redelivered record rewrote the blob (same key, bytes not identical): serve
        # what is stored now, under its own sha256.
        data = await asyncio.to_thread(gw.blobs.get_key, key, max_bytes=MAX_BLOB_BYTES)
    except BlobNotFound:
        raise ApiError(404, "not_found", f"blob {key!r} is gone from the store") from None
    except BlobError as exc:
        raise ApiError(503, "blob_store_unavailable", str(exc)[:300]) from None
    headers = {"ETag": f'"{sha256_hex(data)}"', "Cache-Control": "private, no-cache"}
    return Response(data, media_type=ref.media_type, headers=headers)


@router.get("/queue", response_model=QueueView, summary="Lag, members, queued and running")
async def queue(gw: Gateway, who: Who) -> QueueView:
    if gw.queue is None:
        raise ApiError(503, "starting", "the gateway is starting or stopping")
    return await gw.queue.read()
