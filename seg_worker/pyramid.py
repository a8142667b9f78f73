"""Pyramid segmentation: one prompt at several image scales, merged at full size.

At each scale ``s`` the image is resized to ``round(s * H) x round(s * W)`` and
encoded (once, cached by ``(sha256, s)``); the prompt, given in full-image
pixels, is mapped into that view; SAM's low-res mask logits are brought straight
back to the full ``H x W`` frame; the logits of all scales are averaged per
multimask output, and so are the predicted IoUs. The caller picks the best
output and thresholds at 0 (SAM's ``mask_threshold``).

Note: SAM resizes every view's long side to the encoder's ``img_size``, so a
scale below ``img_size / long side`` shows the encoder a blurrier (low-passed)
image rather than a smaller one; averaging the logits over scales favours
regions that stay stable across that blur.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from seg_worker.predictor import CachedPredictor, Embedding, EmbedKey
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


@torch.inference_mode()
def predict_pyramid(
    predictor: CachedPredictor,
    embeddings: Sequence[Embedding],
    prompt: Prompt,
    out_size: tuple[int, int],
) -> tuple[torch.Tensor, np.ndarray]:
    """Mean mask logits ``[3, H, W]`` over the views in ``embeddings`` and mean
    predicted IoUs ``[3]``, for ``prompt`` given in pixels of ``out_size`` = (H, W)."""
    total: torch.Tensor | None = None
    scores = np.zeros((0,), np.float32)
    for emb in embeddings:
        logits, ious = predictor.predict_logits(
            emb,
            points=prompt.points,
            point_labels=prompt.point_labels,
            box=prompt.box,
            out_size=out_size,
        )
        if total is None:
            total, scores = logits, ious.astype(np.float32)
        else:
            total = total + logits
            scores = scores + ious
    if total is None:
        raise ValueError("predict_pyramid needs at least one embedding")
    n = len(embeddings)
    return total / n, scores / n
