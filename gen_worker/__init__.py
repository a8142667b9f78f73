"""The generator stage: diffusers text-to-image and inpainting.

- :mod:`gen_worker.profiles`: model profiles (``tiny``, ``random``, ``pretrained``);
- :mod:`gen_worker.samplers`: contract sampler names -> diffusers schedulers;
- :mod:`gen_worker.attention`: cross-attention heat maps, batch-invariant UNet calls;
- :mod:`gen_worker.generate`: pure generation (samples -> images + heat maps);
- :mod:`gen_worker.oom`: the out-of-memory ladder;
- :mod:`gen_worker.handler`: :class:`GenStage`, the stage the runtime runs.

Heavy imports (torch, diffusers) happen when a submodule is imported, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gen_worker.handler import GenStage

__all__ = ["GenStage"]


def __getattr__(name: str) -> Any:
    if name == "GenStage":
        from gen_worker.handler import GenStage

        return GenStage
    raise AttributeError(name)
