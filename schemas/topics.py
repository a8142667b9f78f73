"""Topic names of the contract: ``{prefix}.{name}``, prefix ``genseg`` by default."""

from __future__ import annotations

from dataclasses import dataclass

TOPIC_NAMES = (
    "prompts", "images", "masks", "assets", "progress", "dlq", "scenes", "deletions",
)  # fmt: skip
#: Topics genseg uses between its own stages: not part of the contract, created alongside.
INTERNAL_TOPIC_NAMES = ("scene-views", "webhooks")


@dataclass(frozen=True)
class Topics:
    """The full topic names for one prefix (``GENSEG_TOPIC_PREFIX``)."""

    prefix: str = "genseg"

    def name(self, short: str) -> str:
        if short not in TOPIC_NAMES and short not in INTERNAL_TOPIC_NAMES:
            raise ValueError(f"unknown topic {short!r}; expected one of {TOPIC_NAMES}")
        return f"{self.prefix}.{short}"

    @property
    def prompts(self) -> str:
        return self.name("prompts")

    @property
    def images(self) -> str:
        return self.name("images")

    @property
    def masks(self) -> str:
        return self.name("masks")

    @property
    def assets(self) -> str:
        return self.name("assets")

    @property
    def progress(self) -> str:
        return self.name("progress")

    @property
    def dlq(self) -> str:
        return self.name("dlq")

    @property
    def scenes(self) -> str:
        return self.name("scenes")

    @property
    def deletions(self) -> str:
        """Deletion events: a request's blobs were deleted; forget it (keyed by its id)."""
        return self.name("deletions")

    @property
    def scene_views(self) -> str:
        """Internal: one "view done" record per finished view, keyed by scene id."""
        return self.name("scene-views")

    @property
    def webhooks(self) -> str:
        """Internal: webhook deliveries, and the dispatcher's given-up ones (dead letters)."""
        return self.name("webhooks")

    def all(self) -> list[str]:
        return [self.name(short) for short in TOPIC_NAMES]

    def internal(self) -> list[str]:
        """The internal topics (not part of the contract)."""
        return [self.name(short) for short in INTERNAL_TOPIC_NAMES]
