"""The segmenter stage: Segment Anything masks and RGBA assets.

``SegStage(Settings())`` is the worker (image-ready -> mask-ready + asset-ready);
:class:`Segmenter` is the same segmentation without Kafka or blobs;
:mod:`seg_worker.profiles` holds the model profiles (built-in, and plug-ins found
through entry points).

Import style (the same in ``gen_worker``): the package exports its names lazily, through
``__getattr__``, so importing the package or a light submodule imports no model library
until a name that needs one is used (``genseg submit`` must not pay for torch).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seg_worker.config import SegConfig
    from seg_worker.handler import SegStage
    from seg_worker.predictor import CachedPredictor, EmbeddingCache
    from seg_worker.profiles import ARCHS, SegProfile, build_sam, load_sam
    from seg_worker.segment import Segmenter

#: Exported name -> the module that defines it (imported on first access).
_EXPORTS = {
    "ARCHS": "seg_worker.profiles",
    "CachedPredictor": "seg_worker.predictor",
    "EmbeddingCache": "seg_worker.predictor",
    "SegConfig": "seg_worker.config",
    "SegProfile": "seg_worker.profiles",
    "SegStage": "seg_worker.handler",
    "Segmenter": "seg_worker.segment",
    "build_sam": "seg_worker.profiles",
    "load_sam": "seg_worker.profiles",
}

__all__ = [
    "ARCHS",
    "CachedPredictor",
    "EmbeddingCache",
    "SegConfig",
    "SegProfile",
    "SegStage",
    "Segmenter",
    "build_sam",
    "load_sam",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seg_worker' has no attribute {name!r}")
