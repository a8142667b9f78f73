"""The generator stage: diffusers text-to-image and inpainting.

- :mod:`gen_worker.registry`: what a model profile is; plug-in profiles (entry points);
- :mod:`gen_worker.profiles`: the built-in profiles (``tiny``, ``random``,
  ``pretrained``), the lookup by name, :class:`GenModels`;
- :mod:`gen_worker.architectures`: the built-in networks (SD 1.5, SDXL) and their
  seeded weights;
- :mod:`gen_worker.families`: what differs between the SD 1.5 and SDXL pipelines;
- :mod:`gen_worker.checkpoints`: which architecture a pretrained checkpoint is, loading it;
- :mod:`gen_worker.lora`: per-request LoRA adapters (names, cache, activation);
- :mod:`gen_worker.samplers`: contract sampler names -> diffusers schedulers;
- :mod:`gen_worker.attention`: cross-attention heat maps, batch-invariant UNet calls;
- :mod:`gen_worker.generate`: pure generation (samples -> images + heat maps);
- :mod:`gen_worker.oom`: the out-of-memory ladder;
- :mod:`gen_worker.handler`: :class:`GenStage`, the stage the runtime runs.

Import style (the same in ``seg_worker``): the package exports its names lazily, through
``__getattr__``, so importing the package or a light submodule imports no model library.
That matters because processes that never run this stage import parts of it: a
segmenter worker loads a plug-in module that defines a :class:`GenProfile` too (from
:mod:`gen_worker.registry`), and ``genseg submit`` must not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gen_worker.handler import GenStage
    from gen_worker.registry import GenProfile

#: Exported name -> the module that defines it (imported on first access).
_EXPORTS = {"GenStage": "gen_worker.handler", "GenProfile": "gen_worker.registry"}

__all__ = ["GenProfile", "GenStage"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gen_worker' has no attribute {name!r}")
