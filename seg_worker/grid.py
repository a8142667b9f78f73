"""Automatic mode for backends without segment-anything's generator: a point grid.

What ``SamAutomaticMaskGenerator`` does on one full-image crop, with its own helpers
(``build_point_grid``, ``calculate_stability_score``, ``batched_mask_to_box``) and
its filters in its order: a ``points_per_side``² grid of single foreground points,
every multimask output kept when its predicted IoU is above ``pred_iou_thresh``
(filter off at 0) and its stability score (IoU of the mask thresholded at
``mask_threshold`` ± 1) at least ``stability_thresh`` (off at 0), then box
non-maximum suppression at IoU 0.7 across the whole grid, highest predicted IoU
first. The IoU filter runs before upsampling, so only kept masks reach full size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
)
from torchvision.ops import batched_nms

#: SamAutomaticMaskGenerator's defaults.
BOX_NMS_THRESH = 0.7
STABILITY_OFFSET = 1.0


def grid_points(points_per_side: int, height: int, width: int) -> np.ndarray:
    """``[n², 2]`` float32 (x, y) pixel centres of the grid cells, row by row."""
    return (build_point_grid(points_per_side) * np.array([width, height])).astype(np.float32)


def grid_masks(
    predict: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    upsample: Callable[[torch.Tensor], torch.Tensor],
    size: tuple[int, int],
    *,
    mask_threshold: float,
    points_per_side: int,
    points_per_batch: int,
    pred_iou_thresh: float,
    stability_thresh: float,
) -> list[tuple[float, np.ndarray]]:
    """(predicted IoU, ``[H, W]`` bool mask) of the objects a point grid finds.

    ``predict(points [B, 2])`` -> low-res logits ``[B, C, h, w]`` and IoUs ``[B, C]``
    of single-point prompts; ``upsample(logits [K, h, w])`` -> ``[K, H, W]`` logits
    at ``size`` = (H, W).
    """
    masks: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    points = grid_points(points_per_side, *size)
    for start in range(0, len(points), max(1, points_per_batch)):
        low, ious = predict(points[start : start + points_per_batch])
        low, ious = low.flatten(0, 1), ious.flatten(0, 1).float().cpu()
        if pred_iou_thresh > 0.0:
            keep = ious > pred_iou_thresh
            low, ious = low[keep.to(low.device)], ious[keep]
        if not len(ious):
            continue
        logits = upsample(low)
        if stability_thresh > 0.0:
            stable = calculate_stability_score(logits, mask_threshold, STABILITY_OFFSET)
            keep = stable >= stability_thresh
            logits, ious = logits[keep], ious[keep]
        masks.append(logits > mask_threshold)
        scores.append(ious)
    if not masks:
        return []
    all_masks, all_scores = torch.cat(masks), torch.cat(scores)
    boxes = batched_mask_to_box(all_masks).float()
    order = batched_nms(
        boxes, all_scores, torch.zeros(len(all_scores), dtype=torch.long), BOX_NMS_THRESH
    )
    return [(float(all_scores[i]), all_masks[i].numpy()) for i in order.tolist()]
