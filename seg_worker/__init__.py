"""The segmenter stage: Segment Anything masks and RGBA assets.

``SegStage(Settings())`` is the worker (image-ready -> mask-ready + asset-ready);
:class:`Segmenter` is the same segmentation without Kafka or blobs.
"""

from seg_worker.config import SegConfig
from seg_worker.handler import SegStage
from seg_worker.predictor import CachedPredictor, EmbeddingCache
from seg_worker.profiles import ARCHS, build_sam, load_sam
from seg_worker.segment import Segmenter

__all__ = [
    "ARCHS",
    "CachedPredictor",
    "EmbeddingCache",
    "SegConfig",
    "SegStage",
    "Segmenter",
    "build_sam",
    "load_sam",
]
