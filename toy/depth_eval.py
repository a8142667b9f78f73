"""How good a depth model is on rendered views of the 3D toy world: AbsRel and delta < 1.25,
through :class:`seg_worker.depth.DepthEstimator` (the seg worker's own code path)."""

from __future__ import annotations

import numpy as np

from seg_worker.depth import DepthEstimator
from toy.depth_data import ViewData


def depth_errors(estimator: DepthEstimator, views: ViewData) -> dict[str, float]:
    """Per-pixel errors of ``estimator`` on ``views`` (metric models only): ``abs_rel``
    the mean of ``|pred - true| / true`` over all pixels of all views, its standard
    error across views, ``delta1`` the share of pixels with ``max(pred/true,
    true/pred) < 1.25``."""
    if estimator.units != "metres":
        raise ValueError("AbsRel against world depth needs a metric depth model")
    per_view, delta = [], []
    for image, true in zip(views.images.numpy(), views.depth.numpy(), strict=True):
        pred = estimator.estimate(image).values.astype(np.float64)
        true = true.astype(np.float64)
        per_view.append(float(np.mean(np.abs(pred - true) / true)))
        ratio = np.maximum(pred / true, true / np.maximum(pred, 1e-6))
        delta.append(float(np.mean(ratio < 1.25)))
    rel = np.array(per_view)
    return {
        "views": len(rel),
        "abs_rel": round(float(rel.mean()), 4),
        "abs_rel_se": round(float(rel.std(ddof=1) / np.sqrt(len(rel))), 4) if len(rel) > 1 else 0.0,
        "delta1": round(float(np.mean(delta)), 4),
    }


__all__ = ["depth_errors"]
