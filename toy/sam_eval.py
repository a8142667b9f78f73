"""Evaluation of a toy SAM on evaluation scenes of the toy world (never trained on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from seg_worker.profiles import load_sam
from toy.profiles import SEG_PROFILE, TOY_SAM_ARCH
from toy.sam_data import jitter_boxes, random_point_in
from toy.sam_losses import true_iou
from toy.world import EVAL_SEED_BASE, make_scene


def evaluate_sam(
    model: Sam, *, scenes: int = 100, seed_base: int = EVAL_SEED_BASE, min_confidence: float = 0.8
) -> dict[str, float]:
    """Mean IoU on the objects of ``scenes`` evaluation scenes through ``SamPredictor``
    (multimask output, best by predicted IoU, as the worker does) for a ground-truth box,
    a jittered box plus a point inside, and the object's centre point; and the IoU
    head's calibration over those predictions (mean absolute error, and how well
    ``predicted IoU >= min_confidence`` separates true IoUs >= that), plus the share of
    background points whose prediction would pass ``min_confidence``."""
    predictor = SamPredictor(model)
    gen = torch.Generator().manual_seed(1234)
    ious: dict[str, list[float]] = {"box": [], "box_point": [], "point": []}
    pred_all, true_all, bg_pass = [], [], []
    for seed in range(seed_base, seed_base + scenes):
        scene = make_scene(seed)
        predictor.set_image(scene.image)
        masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
        size = scene.image.shape[0]
        inside = random_point_in(masks, gen)
        centres = torch.tensor([o.center for o in scene.objects], dtype=torch.float32).floor()
        tf = predictor.transform
        shape = scene.image.shape[:2]
        cases = {
            "box": (None, None, boxes),
            "box_point": (
                inside[:, None],
                torch.ones(len(masks), 1),
                jitter_boxes(boxes, 0.2, size, gen),
            ),
            "point": (centres[:, None], torch.ones(len(masks), 1), None),
        }
        for name, (pts, lab, bx) in cases.items():
            out, scores, _ = predictor.predict_torch(
                None if pts is None else tf.apply_coords_torch(pts, shape),
                lab,
                None if bx is None else tf.apply_boxes_torch(bx, shape),
                multimask_output=True,
            )
            best = scores.argmax(dim=1)
            chosen = out[torch.arange(len(best)), best]
            t = true_iou(chosen[:, None].float(), masks.float(), 0.5)[:, 0]
            ious[name] += t.tolist()
            pred_all += scores[torch.arange(len(best)), best].tolist()
            true_all += t.tolist()
        # Background points: pixels owned by no object, a few per scene.
        free = ~masks.any(dim=0)
        bg = random_point_in(free[None].expand(3, -1, -1), gen)[:, None]
        _, scores, _ = predictor.predict_torch(
            tf.apply_coords_torch(bg, shape), torch.ones(3, 1), None, multimask_output=True
        )
        bg_pass += (scores.max(dim=1).values >= min_confidence).tolist()
    pred, true = np.array(pred_all), np.array(true_all)
    accepted = pred >= min_confidence
    good = true >= min_confidence
    return {
        "objects": len(ious["box"]),
        "box_miou": float(np.mean(ious["box"])),
        "box_point_miou": float(np.mean(ious["box_point"])),
        "point_miou": float(np.mean(ious["point"])),
        "iou_head_mae": float(np.abs(pred - true).mean()),
        "iou_head_bias": float((pred - true).mean()),
        "accept_precision": float(good[accepted].mean()) if accepted.any() else 0.0,
        "accept_recall": float(accepted[good].mean()) if good.any() else 0.0,
        "background_pass_rate": float(np.mean(bg_pass)),
    }


def load_trained(path: str | Path) -> Sam:
    """The toy SAM with the weights in ``path`` (through the pretrained code path)."""
    return load_sam(SEG_PROFILE.name, TOY_SAM_ARCH, checkpoint=str(path))
