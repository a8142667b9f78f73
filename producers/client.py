"""The upstream client API: submit prompts (and sets of views) to genseg."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from opentelemetry import trace

from genseg.settings import Settings
from producers.publisher import Publisher
from schemas import PromptEvent

#: The source article's viewing angles for multi-view scenes (degrees).
DEFAULT_VIEWS = (0, 45, 90, 135)


def new_request_id(prefix: str = "req") -> str:
    """A fresh request id matching the contract's id pattern."""
    return f"{prefix}-{secrets.token_hex(8)}"


class GensegClient:
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

    async def __aenter__(self) -> GensegClient:
        if self._own_publisher:
            await self.publisher.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        views: Sequence[int] = DEFAULT_VIEWS,
        scene_id: str | None = None,
        targets: Sequence[str] = (),
        **options: Any,
    ) -> list[str]:
        """Submit one prompt per viewing angle of a multi-view scene; return the ids.

        Views share size, steps and sampler, so the generator batches them on one
        card (the source article's four views). Ids are ``{scene_id}.view-{angle}``.
        """
        scene = scene_id or new_request_id("scene")
        ids = []
        for angle in views:
            view_prompt = f"{prompt}, view from {angle} degrees"
            ids.append(
                await self.submit(
                    view_prompt,
                    targets=targets,
                    request_id=f"{scene}.view-{angle}",
                    **options,
                )
            )
        return ids


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
