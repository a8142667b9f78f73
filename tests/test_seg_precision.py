"""GENSEG_SEG_DTYPE: segment-anything under autocast (bf16 on CUDA by default), checked
on the CPU, whose autocast runs bf16 too: the same masks within half precision's
rounding, fp32 out of every pass, the automatic mode included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from plumbing.settings import Settings
from seg_worker.backends import load_backend
from seg_worker.config import SegConfig
from seg_worker.predictor import CachedPredictor
from seg_worker.profiles import autocast_dtype, load_sam

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_fp32_on_the_cpu_and_explicit_values_hold() -> None:
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp32", CUDA) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", CUDA) is torch.float16
    with pytest.raises(ValueError, match="GENSEG_SEG_DTYPE='int8'"):
        autocast_dtype("int8", CPU)


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().seg_dtype == "auto"
    monkeypatch.setenv("GENSEG_SEG_DTYPE", "bf16")
    assert Settings().seg_dtype == "bf16"
    monkeypatch.setenv("GENSEG_SEG_DTYPE", "half")
    with pytest.raises(ValidationError, match="GENSEG_SEG_DTYPE"):
        Settings()


def predictions(dtype: torch.dtype | None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, list]:
    """Logits and IoUs of one point-and-box prompt, the embedding, and the automatic
    mode's objects, for the tiny model under ``dtype``'s autocast."""
    image = np.random.default_rng(0).integers(0, 255, (96, 120, 3), dtype=np.uint8)
    predictor = CachedPredictor(load_sam("tiny", "tiny"), dtype=dtype)
    emb = predictor.embed(("x", 1.0, None), image)
    logits, ious = predictor.predict_logits(
        emb,
        points=np.array([[30, 40]]),
        point_labels=np.array([1]),
        box=np.array([10, 10, 80, 70]),
        out_size=(96, 120),
    )
    low_res, _ = predictor.predict_low_res(
        emb, points=np.array([[30, 40]]), point_labels=np.array([1]), box=None,
        frame_size=(96, 120),
    )  # fmt: skip
    assert low_res.dtype == torch.float32  # what the pyramid sums and upsamples
    found = predictor.automatic(
        emb, image, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
        stability_thresh=0.0,
    )  # fmt: skip
    return logits, ious, emb.features, found


def test_bf16_gives_the_fp32_masks_within_rounding() -> None:
    logits, ious, features, found = predictions(None)
    logits16, ious16, features16, found16 = predictions(torch.bfloat16)
    # fp32 leaves every pass: the pipeline's numpy code never meets a bf16 tensor.
    assert logits16.dtype == features16.dtype == torch.float32 and ious16.dtype == np.float32
    # Not the same numbers (the passes did run in bf16), the same within its rounding.
    assert not torch.equal(logits, logits16) and not torch.equal(features, features16)
    assert (logits - logits16).abs().max() <= 0.05 * logits.abs().max()
    np.testing.assert_allclose(ious16, ious, atol=0.01)
    mask, mask16 = logits > 0, logits16 > 0
    assert (mask & mask16).sum() / (mask | mask16).sum() > 0.97
    assert len(found16) == len(found) >= 1
    for (score, obj), (score16, obj16) in zip(found, found16, strict=True):
        assert score16 == pytest.approx(score, abs=0.01)
        assert obj16.shape == obj.shape == (96, 120) and (obj16 == obj).mean() > 0.97


def test_the_worker_takes_the_setting() -> None:
    config = SegConfig.for_profile("tiny")
    loaded = load_backend(Settings(models="tiny", device="cpu", seg_dtype="bf16"), config)
    assert isinstance(loaded.backend, CachedPredictor)
    assert loaded.backend.dtype is torch.bfloat16
    assert load_backend(Settings(models="tiny", device="cpu"), config).backend.dtype is None


def test_a_backend_that_runs_fp32_only_refuses_half_precision() -> None:
    settings = Settings(models="tiny", device="cpu", segmenter="sam2", seg_dtype="bf16")
    with pytest.raises(ValueError, match="GENSEG_SEG_DTYPE=bf16 applies to GENSEG_SEGMENTER=sam"):
        load_backend(settings, SegConfig.for_profile("tiny"))
