"""Events genseg passes between its own stages: not part of the contract.

They follow the contract's rules all the same (a ``schema`` field, unknown fields
ignored, no pixels), live on internal topics (:data:`schemas.topics.INTERNAL_TOPIC_NAMES`)
and are listed in docs/contract.md under "Internal".
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.events import AssetReadyEvent, Event, RequestId, SceneView, TenantId

SCHEMA_SCENE_VIEW = "genseg.scene_view/v1"
SCHEMA_WEBHOOK = "genseg.webhook/v1"


class SceneViewRecord(Event):
    """One finished image of a scene view, on ``{prefix}.scene-views``, keyed by scene id.

    The segmenter publishes one per scene image; the scene stage gathers them into
    the scene-ready event.
    """

    schema_: Literal["genseg.scene_view/v1"] = Field(default=SCHEMA_SCENE_VIEW, alias="schema")
    scene_id: RequestId
    views_total: int = Field(ge=1, le=64)
    #: Images per view (the request's ``num_images``): a view is done when all are.
    num_images: int = Field(default=1, ge=1, le=8)
    tenant: TenantId | None = None
    view: SceneView

    @classmethod
    def of(cls, event: AssetReadyEvent, num_images: int = 1) -> SceneViewRecord:
        """The record of a scene image's asset-ready event (``event.scene`` set)."""
        scene = event.scene
        if scene is None:
            raise ValueError(f"{event.id} is not part of a scene")
        return cls(
            scene_id=scene.scene_id,
            views_total=scene.views_total,
            num_images=num_images,
            tenant=event.tenant,
            view=SceneView(
                view=scene.view,
                angle=scene.angle,
                id=event.id,
                image_index=event.image_index,
                status=event.status,
                image=event.image,
                depth=event.depth,
                mesh=event.mesh,
                objects=[item.label for item in event.assets],
            ),
        )


class WebhookDelivery(Event):
    """One terminal outcome delivered to its ``callback_url`` (or refused by the webhook
    policy), on ``{prefix}.webhooks``, keyed by request id. A delivery the dispatcher
    gave up on (or the receiver rejected) is a dead-letter event on the same topic, its
    ``stage`` ``webhook-assets`` or ``webhook-dlq``. The gateway shows both in a
    request's status (docs/webhooks.md)."""

    schema_: Literal["genseg.webhook/v1"] = Field(default=SCHEMA_WEBHOOK, alias="schema")
    id: str | None = None
    image_index: int | None = None
    #: The ``X-Genseg-Delivery`` header: the same for every attempt of one outcome.
    delivery: str
    #: Which terminal event was delivered.
    outcome: Literal["asset", "dead_letter"]
    status: Literal["delivered", "refused"]
    http_status: int | None = None
    attempts: int = Field(ge=1)
    #: Host of the callback URL (not the URL: its path or query may hold a token).
    host: str
    reason: str | None = None
    tenant: TenantId | None = None
