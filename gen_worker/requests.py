"""What the generator stage derives from one request event, before any model runs: the
seed of each image, the batch key (:class:`~gen_worker.generate.BatchSpec`), and the
progress events of a batch while it generates."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from consumers.stage import Output, StageContext
from gen_worker.generate import BatchSpec
from gen_worker.lora import adapter_set
from schemas import InpaintEvent, ProgressEvent, PromptEvent

GenEvent = PromptEvent | InpaintEvent
SEED_SPACE = 2**32


def default_seed(request_id: str) -> int:
    """The seed of a request that names none: derived from its id.

    Not random on purpose: a redelivered record must regenerate the same image, or
    it would overwrite the blob an earlier image-ready event already references
    (with another sha256). Reported in ``params.seed`` like any seed.
    """
    digest = hashlib.sha256(b"genseg-seed\x00" + request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


def image_seeds(event: GenEvent) -> list[int]:
    """Seed of each image: ``seed + i (mod 2**32)`` for image ``i`` of ``num_images``."""
    base = event.seed if event.seed is not None else default_seed(event.id)
    return [(base + i) % SEED_SPACE for i in range(event.num_images)]


def batch_spec(event: GenEvent) -> BatchSpec:
    """What the event shares with every event it may be batched with."""
    progressive = (
        (event.progressive.draft_scale, event.progressive.strength)
        if event.progressive is not None and isinstance(event, PromptEvent)
        else None
    )
    return BatchSpec(
        mode="inpaint" if isinstance(event, InpaintEvent) else "txt2img",
        width=event.width,
        height=event.height,
        steps=event.steps,
        guidance_scale=float(event.guidance_scale),
        sampler=event.sampler,
        strength=float(event.strength) if isinstance(event, InpaintEvent) else 1.0,
        progressive=progressive,
        loras=adapter_set(event.loras),
        scene=event.scene is not None and not isinstance(event, InpaintEvent),
    )


class ProgressEmitter:
    """Publishes progress events at most every ``interval_s``, and always the last step."""

    def __init__(
        self,
        ctx: StageContext,
        events: Sequence[GenEvent],
        items: Sequence[int],
        interval_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.ctx, self.events, self.items = ctx, events, list(dict.fromkeys(items))
        self.interval_s, self.clock = interval_s, clock
        self.last: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done < total and self.last is not None and now - self.last < self.interval_s:
            return
        self.last = now
        for i in self.items:
            source = self.events[i]
            event = ProgressEvent(id=source.id, step=done, steps=total, tenant=source.tenant)
            self.ctx.emit(Output(self.ctx.topics.progress, event), item=i)


__all__ = ["SEED_SPACE", "GenEvent", "ProgressEmitter", "batch_spec", "default_seed", "image_seeds"]
