"""A request's status body, read from the view."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from genseg.gateway.models import (
    AssetView,
    Failure,
    ImageView,
    Progress,
    RequestStatus,
    WebhookView,
)
from genseg.gateway.view import ImageRow, RequestRow, View


class Links:
    """The gateway's URLs, absolute, from the base URL a client called."""

    def __init__(self, base_url: str, blob_key: Callable[[str], str | None]) -> None:
        self.base = base_url.rstrip("/")
        self.blob_key = blob_key

    def status(self, request_id: str) -> str:
        return f"{self.base}/v1/requests/{quote(request_id, safe='')}"

    def events(self, request_id: str) -> str:
        return f"{self.status(request_id)}/events"

    def blob(self, ref: dict[str, Any] | None) -> str | None:
        """The URL of a blob reference, or None when it is not in the gateway's store."""
        key = self.blob_key(ref["uri"]) if ref else None
        return f"{self.base}/v1/blobs/{quote(key, safe='/')}" if key else None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _failure(dead_letter: dict[str, Any] | None) -> Failure | None:
    if not dead_letter:
        return None
    error = dead_letter.get("error") or {}
    return Failure(
        stage=str(dead_letter.get("stage", "")),
        type=str(error.get("type", "")),
        message=str(error.get("message", "")),
        attempts=int(dead_letter.get("attempts", 0)),
    )


def _prompt_text(request: dict[str, Any]) -> str | None:
    if isinstance(request.get("prompt"), str):
        return str(request["prompt"])
    parts = [request.get(k) for k in ("subject", "details", "style")]
    return ", ".join(p for p in parts if isinstance(p, str)) or None


def _webhook(index: int, deliveries: list[dict[str, Any]]) -> WebhookView | None:
    """The webhook state of image ``index``: delivered beats refused beats given up."""
    found: list[WebhookView] = []
    for data in deliveries:
        if data.get("image_index") not in (index, None):
            continue
        if data.get("schema") == "genseg.webhook/v1":
            found.append(
                WebhookView(
                    status=data["status"], outcome=data.get("outcome"),
                    http_status=data.get("http_status"), attempts=data.get("attempts"),
                    host=data.get("host"), reason=data.get("reason"),
                )
            )  # fmt: skip
        else:  # the dispatcher's dead letter: it gave up after its retries
            failure = _failure(data)
            found.append(
                WebhookView(
                    status="failed",
                    attempts=failure.attempts if failure else None,
                    reason=failure.message if failure else None,
                )
            )
    rank = {"delivered": 0, "refused": 1, "failed": 2}
    return min(found, key=lambda w: rank[w.status]) if found else None


def _image(
    index: int,
    row: ImageRow | None,
    request: RequestRow,
    deliveries: list[dict[str, Any]],
    links: Links,
) -> ImageView:
    terminal = row.terminal if row else None
    image_event = row.image if row else None
    image_ref = (image_event or {}).get("image") or (terminal or {}).get("image")
    view = ImageView(
        image_index=index, status="queued", image_url=links.blob(image_ref),
        webhook=_webhook(index, deliveries),
    )  # fmt: skip
    if row is not None and row.outcome == "asset" and terminal is not None:
        view.status = view.asset_status = terminal["status"]
        view.assets = [
            AssetView(
                label=item["label"],
                score=item["score"],
                bbox=item["bbox"],
                url=links.blob(item.get("asset")),
            )
            for item in terminal.get("assets", [])
        ]
    elif row is not None and row.outcome == "dead_letter":
        view.status, view.error = "failed", _failure(terminal)
    elif request.failure is not None:
        view.status, view.error = "failed", _failure(request.failure)
    elif image_event is not None:
        view.status = "segmenting"
    elif request.step is not None:
        view.status = "generating"
    return view


def request_status(view: View, row: RequestRow, links: Links) -> RequestStatus:
    """The status body of the request in ``row``."""
    images = {image.image_index: image for image in view.images(row.id)}
    count = max([row.num_images, *(i + 1 for i in images)])
    deliveries = view.webhooks(row.id)
    request = row.request or {}
    progress = None
    if row.steps:
        done = row.state in ("segmenting", "done") or any(i.image for i in images.values())
        progress = Progress(step=row.steps if done else (row.step or 0), steps=row.steps)
    return RequestStatus(
        id=row.id,
        status=row.state,  # type: ignore[arg-type]  # one of view.STATES
        status_url=links.status(row.id),
        events_url=links.events(row.id),
        tenant=row.tenant,
        prompt=_prompt_text(request),
        targets=list(request.get("targets") or []),
        width=request.get("width"),
        height=request.get("height"),
        steps=request.get("steps"),
        num_images=count,
        created_at=_iso(row.created_ms),
        updated_at=_iso(row.updated_ms),
        progress=progress,
        images=[_image(i, images.get(i), row, deliveries, links) for i in range(count)],
        error=_failure(row.failure),
    )
