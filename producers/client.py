"""The upstream client API: submit prompts (and sets of views) to genseg."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Literal

from opentelemetry import trace

from plumbing.lifecycle import AsyncService
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import PromptEvent, SceneOptions

#: The source article's viewing angles for multi-view scenes (degrees).
DEFAULT_VIEWS = (0, 45, 90, 135)
#: What a scene view gets besides its assets: a depth map and a textured .glb.
SceneOutput = Literal["depth", "mesh"]
DEFAULT_SCENE_OUTPUTS: tuple[SceneOutput, ...] = ("depth", "mesh")


def new_request_id(prefix: str = "req") -> str:
    """A fresh request id matching the contract's id pattern."""
    return f"{prefix}-{secrets.token_hex(8)}"


class GensegClient(AsyncService):
    """Publishes prompt events for upstream systems.

    Usage::

        async with GensegClient(settings) as client:
            request_id = await client.submit("a coffee cup on a table", targets=["coffee cup"])
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        publisher: Publisher | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self._own_publisher = publisher is None
        self.publisher = publisher or Publisher(self.settings, tracer_provider=tracer_provider)

    async def start(self) -> None:
        if self._own_publisher:
            await self.publisher.start()

    async def stop(self) -> None:
        if self._own_publisher:
            await self.publisher.stop()

    async def submit(
        self,
        prompt: str,
        *,
        targets: Sequence[str] = (),
        request_id: str | None = None,
        **options: Any,
    ) -> str:
        """Validate and publish one prompt event; return its request id.

        ``options`` are any other prompt event fields (``width``, ``steps``, ``seed``,
        ``segmentation``...); invalid values raise ``pydantic.ValidationError`` here,
        before anything is published.
        """
        event = PromptEvent(
            id=request_id or new_request_id(), prompt=prompt, targets=list(targets), **options
        )
        await self.publisher.publish(self.settings.topics.prompts, event)
        return event.id

    async def submit_views(
        self,
        prompt: str,
        *,
        views: Sequence[float] = DEFAULT_VIEWS,
        scene_id: str | None = None,
        targets: Sequence[str] = (),
        outputs: Sequence[SceneOutput] = DEFAULT_SCENE_OUTPUTS,
        **options: Any,
    ) -> list[str]:
        """Submit one prompt per viewing angle of a multi-view scene; return the ids.

        Each event carries the ``scene`` block (``scene_id``, ``view`` = the angle as
        text, ``views_total``, ``angle``, ``outputs``: ``depth`` and/or ``mesh``), so the
        segmenter adds depth maps and ``.glb`` files and one scene-ready event follows
        the last view. Views share size, steps and sampler, so the generator batches
        them on one card (the source article's four views). Ids are
        ``{scene_id}.view-{angle}``. Everything is validated before anything is published.
        """
        scene = scene_id or new_request_id("scene")
        events = []
        for angle in views:
            name = f"{angle:g}"  # 45 and 45.0 are one view: "45"
            events.append(
                PromptEvent(
                    id=f"{scene}.view-{name}",
                    prompt=f"{prompt}, view from {name} degrees",
                    targets=list(targets),
                    scene=SceneOptions(
                        scene_id=scene,
                        view=name,
                        views_total=len(views),
                        angle=float(angle),
                        outputs=list(outputs),
                    ),
                    **options,
                )
            )
        if len({e.id for e in events}) != len(events):
            raise ValueError(f"views must be distinct angles, got {list(views)}")
        for event in events:
            await self.publisher.publish(self.settings.topics.prompts, event)
        return [e.id for e in events]


async def submit(
    prompt: str,
    *,
    targets: Sequence[str] = (),
    settings: Settings | None = None,
    **options: Any,
) -> str:
    """One-shot :meth:`GensegClient.submit` with its own connection."""
    async with GensegClient(settings) as client:
        return await client.submit(prompt, targets=targets, **options)
