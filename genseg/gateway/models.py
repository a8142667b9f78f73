"""The gateway's response bodies, as pydantic models (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

RequestState = Literal["queued", "generating", "segmenting", "done", "failed"]
ImageState = Literal["queued", "generating", "segmenting", "ok", "no_match", "failed"]


class ErrorBody(BaseModel):
    """Every error: a machine-readable ``error``, a sentence, and details when useful."""

    error: str = Field(examples=["invalid_request"])
    message: str
    details: list[dict[str, Any]] | None = None


class Accepted(BaseModel):
    id: str
    status: RequestState
    status_url: str
    events_url: str


class Progress(BaseModel):
    step: int
    steps: int


class Failure(BaseModel):
    """A dead letter's reason."""

    stage: str
    type: str
    message: str
    attempts: int


class AssetView(BaseModel):
    label: str
    score: float
    bbox: list[float]
    url: str | None = Field(description="The RGBA cut-out; None when outside the blob store")


class WebhookView(BaseModel):
    status: Literal["delivered", "refused", "failed"]
    outcome: str | None = None
    http_status: int | None = None
    attempts: int | None = None
    host: str | None = None
    reason: str | None = None


class ImageView(BaseModel):
    image_index: int
    status: ImageState
    image_url: str | None = None
    asset_status: Literal["ok", "no_match"] | None = None
    assets: list[AssetView] = Field(default_factory=list)
    error: Failure | None = None
    webhook: WebhookView | None = None


class RequestStatus(BaseModel):
    id: str
    status: RequestState
    status_url: str
    events_url: str
    tenant: str | None = None
    prompt: str | None = None
    targets: list[str] = Field(default_factory=list)
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    num_images: int
    created_at: str
    updated_at: str
    progress: Progress | None = None
    images: list[ImageView] = Field(default_factory=list)
    error: Failure | None = Field(default=None, description="A failure of every image")


class Deleted(BaseModel):
    """What ``DELETE /v1/requests/{id}`` did (the deletion event's figures)."""

    id: str
    deleted: bool = True
    blobs_deleted: int
    bytes_deleted: int


class RequestList(BaseModel):
    requests: list[RequestStatus]


class Member(BaseModel):
    member_id: str
    client_id: str
    host: str
    partitions: int


class StageQueue(BaseModel):
    stage: str
    group: str
    lag: int | None = Field(description="Records not yet processed; None: unknown")
    members: list[Member] = Field(default_factory=list)
    state: str | None = None


class QueueView(BaseModel):
    stages: list[StageQueue]
    requests: dict[str, int] = Field(
        description="queued, running (generating or segmenting), done and failed requests"
    )
    checked_at: str
