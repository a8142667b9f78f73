"""The seam between the segmenter and a model: what a segmenter backend does.

:class:`~seg_worker.segment.Segmenter` plans prompts, merges pyramids, retries
crops and finishes objects; a backend turns image views into embeddings (cached)
and prompts into masks. Three backends (``GENSEG_SEGMENTER``):

- ``sam``: segment-anything's ``Sam`` through :class:`~seg_worker.predictor.CachedPredictor`;
- ``sam2``: SAM 2.1 through transformers' ``Sam2Model`` (:mod:`seg_worker.hf_sam2`);
- ``sam3``: SAM 3 through transformers' ``Sam3Model`` (:mod:`seg_worker.hf_sam3`):
  instance masks for a text concept.

Each serves the modes in :data:`MODES`; a request for another mode gets an
:class:`UnsupportedMode` (a permanent error: dead letter) naming the setting to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from plumbing.errors import PermanentError
from seg_worker.embedding import Embedding, EmbeddingCache, EmbedKey, LazyView

#: Values of ``GENSEG_SEGMENTER``, the default first.
BACKENDS = ("sam", "sam2", "sam3")

#: Modes served with point and box prompts (heat maps, explicit prompts, a point grid).
PROMPT_MODES = frozenset({"attention", "boxes", "points", "auto"})
#: Modes served with text concepts.
CONCEPT_MODES = frozenset({"concept", "attention+concept"})

#: Backend -> the segmentation modes it serves.
MODES: dict[str, frozenset[str]] = {
    "sam": PROMPT_MODES,
    "sam2": PROMPT_MODES,
    "sam3": CONCEPT_MODES,
}


class UnsupportedMode(PermanentError):
    """A segmentation mode this worker's backend does not serve (dead letter)."""

    error_type = "unsupported_mode"

    def __init__(self, mode: str, backend: str) -> None:
        servers = [name for name in BACKENDS if mode in MODES[name]]
        todo = " or ".join(f"GENSEG_SEGMENTER={name}" for name in servers)
        super().__init__(
            f"segmentation mode {mode!r} is not served by this worker's segmenter "
            f"(GENSEG_SEGMENTER={backend}); send it to a segmenter worker with {todo}"
        )
        self.mode = mode
        self.backend = backend


def check_backend(name: str) -> str:
    """``name`` when it is a known backend; else a one-line ValueError naming the setting."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown GENSEG_SEGMENTER {name!r}: expected one of {', '.join(BACKENDS)}"
        )
    return name


@dataclass(eq=False)
class Instance:
    """One object a concept query found."""

    score: float  # detection confidence in 0..1
    mask: np.ndarray  # [H, W] bool at the requested size


@runtime_checkable
class SegBackend(Protocol):
    """A segmentation model with a cached image encoder.

    Prompts (points, boxes) are in pixels of a ``frame_size`` = (H, W) frame that
    covers the whole encoded view (the full image at any pyramid scale; the crop for
    a crop). Methods of modes a backend does not serve raise :class:`UnsupportedMode`.
    """

    #: ``sam``, ``sam2`` or ``sam3``.
    name: str
    #: The segmentation modes served (see :data:`MODES`).
    modes: frozenset[str]
    cache: EmbeddingCache
    encoder_images: int
    encoder_batches: int

    @property
    def mask_threshold(self) -> float:
        """Logit above which a pixel is inside a mask."""
        ...

    def embed(self, key: EmbedKey, view: LazyView) -> Embedding: ...

    def embed_many(
        self, items: Sequence[tuple[EmbedKey, LazyView]], *, batch_size: int = 1
    ) -> list[Embedding]: ...

    def predict_low_res(
        self,
        emb: Embedding,
        *,
        points: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        frame_size: tuple[int, int],
        multimask: bool = True,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Low-res mask logits ``[C, h, w]`` and predicted IoUs ``[C]`` of one prompt."""
        ...

    def upsample(
        self, emb: Embedding, low_res: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits ``[K, h, w]`` of ``emb``'s view -> ``[K, H, W]`` float32 CPU."""
        ...

    def automatic(
        self,
        emb: Embedding,
        image: np.ndarray,
        *,
        points_per_side: int,
        points_per_batch: int,
        pred_iou_thresh: float,
        stability_thresh: float,
    ) -> list[tuple[float, np.ndarray]]:
        """(predicted IoU, ``[H, W]`` bool mask) of every object a point grid finds on
        ``image``, the view ``emb`` was computed from."""
        ...

    def concept(
        self,
        emb: Embedding,
        text: str,
        out_size: tuple[int, int],
        *,
        min_score: float,
        max_instances: int,
    ) -> list[Instance]:
        """Every instance of ``text`` in ``emb``'s view with score >= ``min_score``
        (at most ``max_instances``, highest score first), masks at ``out_size``."""
        ...
