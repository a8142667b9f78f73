"""Pyramid segmentation: one prompt at several image scales, merged at full size.

At each scale ``s`` the image is resized to ``round(s * H) x round(s * W)`` and
encoded (once, cached by ``(sha256, s)``); the prompt, given in full-image
pixels, is mapped into that view; SAM's low-res mask logits are brought straight
back to the full ``H x W`` frame (any :class:`~seg_worker.backend.SegBackend` that serves
prompts). The predicted IoUs of each multimask output
are averaged over the scales, the output with the best mean is kept, and its
logits are averaged over the scales; the caller thresholds them at 0 (SAM's
``mask_threshold``).

Note: SAM resizes every view's long side to the encoder's ``img_size``, so a
scale below ``img_size / long side`` shows the encoder a blurrier (low-passed)
image rather than a smaller one; averaging the logits over scales favours
regions that stay stable across that blur.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from seg_worker.backend import SegBackend
from seg_worker.embedding import Embedding, EmbedKey
from seg_worker.prompts import Prompt


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(h, w)`` of the view at ``scale``, at least 1 px each."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def scaled_view(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 resized by ``scale`` (bilinear, antialiased when shrinking)."""
    height, width = image.shape[:2]
    size = scaled_size(height, width, scale)
    if size == (height, width):
        return image
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def view_items(
    image: np.ndarray, sha256: str, scales: Sequence[float]
) -> list[tuple[EmbedKey, Callable[[], np.ndarray]]]:
    """Cache keys and lazy views of ``image`` for every pyramid scale."""
    return [((sha256, float(s), None), lambda s=s: scaled_view(image, s)) for s in scales]


@dataclass(frozen=True, eq=False)
class PyramidResult:
    """The merged prediction of one prompt."""

    logits: torch.Tensor  # [H, W] float32: mean over scales of the best output's logits
    scores: np.ndarray  # [C] predicted IoU of each multimask output, mean over scales
    best: int  # index of the output kept (highest mean predicted IoU)

    @property
    def score(self) -> float:
        return float(self.scores[self.best])


@torch.inference_mode()
def predict_pyramid(
    predictor: SegBackend,
    embeddings: Sequence[Embedding],
    prompt: Prompt,
    out_size: tuple[int, int],
) -> PyramidResult:
    """Merge ``prompt``'s prediction over the views in ``embeddings`` (one per scale).

    The prompt is in pixels of the ``out_size`` = (H, W) frame. The best multimask
    output is chosen on the mean predicted IoU first, so only that output is
    upsampled to full size (a third of the work and memory of upsampling all).
    """
    if not embeddings:
        raise ValueError("predict_pyramid needs at least one embedding")
    low_res, scores = [], np.zeros((0,), np.float32)
    for emb in embeddings:
        low, ious = predictor.predict_low_res(
            emb,
            points=prompt.points,
            point_labels=prompt.point_labels,
            box=prompt.box,
            frame_size=out_size,
        )
        low_res.append(low)
        scores = ious.astype(np.float32) if not len(scores) else scores + ious
    scores = scores / len(embeddings)
    best = int(np.argmax(scores))
    total: torch.Tensor | None = None
    for emb, low in zip(embeddings, low_res, strict=True):
        logits = predictor.upsample(emb, low[best : best + 1], out_size)[0]
        total = logits if total is None else total + logits
    assert total is not None
    return PyramidResult(total / len(embeddings), scores, best)
