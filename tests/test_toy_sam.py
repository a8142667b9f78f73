"""The toy Segment Anything: its shipped weights, its loading path, its training loop.

Real models on the CPU, no mocks. The quality check runs the shipped weights on
evaluation scenes of the toy world (seeds from ``EVAL_SEED_BASE``, never trained on).
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from plumbing.settings import Settings
from schemas import SegmentationOptions
from seg_worker import SegStage
from seg_worker.config import SegConfig
from seg_worker.predictor import CachedPredictor
from seg_worker.profiles import build_sam, load_sam, read_checkpoint
from seg_worker.segment import Segmenter
from toy.profiles import TOY_SAM_ARCH
from toy.sam_data import ToyData
from toy.sam_eval import evaluate_sam
from toy.train_sam import Recipe, save_sam, train_sam
from toy.weights import SAM_WEIGHTS
from toy.world import EVAL_SEED_BASE, iou, make_scene

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def toy_sam():
    return load_sam("toy", "vit_b")


def test_shipped_weights_load_through_the_pretrained_path(toy_sam) -> None:
    """``toy`` = the toy architecture + the shipped safetensors, loaded strictly like
    ``pretrained``; SAM_CHECKPOINT (``checkpoint``) overrides the file."""
    assert SAM_WEIGHTS.is_file() and SAM_WEIGHTS.stat().st_size < 8 * 2**20
    state = read_checkpoint(str(SAM_WEIGHTS))
    assert toy_sam.image_encoder.img_size == TOY_SAM_ARCH.img_size == 64
    assert set(state) == set(toy_sam.state_dict())
    for name, value in toy_sam.state_dict().items():
        assert torch.equal(value, state[name].to(value.dtype)), name
    same = load_sam("pretrained", TOY_SAM_ARCH, checkpoint=str(SAM_WEIGHTS))
    for (name, a), b in zip(toy_sam.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # The shipped weights are trained, not the seeded initialisation.
    assert not torch.equal(
        build_sam(TOY_SAM_ARCH).mask_decoder.iou_token.weight, toy_sam.mask_decoder.iou_token.weight
    )
    with pytest.raises(ValueError, match="does not fit architecture"):
        load_sam("pretrained", "tiny", checkpoint=str(SAM_WEIGHTS))


def test_safetensors_checkpoint_round_trip(tmp_path) -> None:
    source = build_sam("tiny", seed=7)
    with torch.no_grad():
        source.mask_decoder.iou_token.weight.add_(1.0)
    path = tmp_path / "sam_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert set(read_checkpoint(str(path))) == set(source.state_dict())
    loaded = load_sam("pretrained", "tiny", checkpoint=str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError):
        load_sam("toy", "vit_b", checkpoint=str(tmp_path / "missing.safetensors"))


def test_training_loop_smoke(tmp_path) -> None:
    """A few steps on a few scenes: finite losses, changed weights, a loadable file."""
    data = ToyData.from_seeds(range(12))
    losses: list[float] = []
    recipe = Recipe(steps=4, batch=4, per_kind=1, warmup=2, scenes=12)
    model = train_sam(
        recipe, data=data, log_every=2, on_step=lambda _s, st: losses.append(st["loss"])
    )
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    init = build_sam(TOY_SAM_ARCH, seed=recipe.seed)
    changed = [
        name
        for (name, a), b in zip(init.state_dict().items(), model.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    ]
    assert len(changed) > len(init.state_dict()) // 2
    assert not any(p.requires_grad for p in model.parameters())
    path = save_sam(model, tmp_path / "sam.safetensors")
    assert set(load_file(str(path))) == set(init.state_dict())
    again = load_sam("toy", "vit_b", checkpoint=str(path))
    assert torch.equal(again.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)


def test_training_is_deterministic() -> None:
    data = ToyData.from_seeds(range(8))
    recipe = Recipe(steps=2, batch=4, per_kind=1, warmup=1, scenes=8)
    digests = []
    for _ in range(2):
        model = train_sam(recipe, data=data, log_every=10)
        h = hashlib.sha256()
        for value in model.state_dict().values():
            h.update(value.numpy().tobytes())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]


def test_shipped_weights_segment_eval_scenes(toy_sam) -> None:
    """Regression test of the shipped weights on 20 evaluation scenes."""
    figures = evaluate_sam(toy_sam, scenes=20)
    assert figures["objects"] >= 30
    assert figures["box_miou"] >= 0.9, figures
    assert figures["box_point_miou"] >= 0.85, figures
    assert figures["iou_head_mae"] <= 0.1, figures
    assert figures["background_pass_rate"] <= 0.2, figures


def test_toy_profile_in_the_segmenter(toy_sam) -> None:
    """The worker's own path (Segmenter, toy SegConfig): boxes mode finds each object
    of an evaluation scene and the automatic mode finds its objects without a target."""
    segmenter = Segmenter(CachedPredictor(toy_sam), SegConfig.for_profile("toy"))
    scene = make_scene(EVAL_SEED_BASE + 3)
    boxes = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (o.box for o in scene.objects)]
    names = [o.name for o in scene.objects]
    got = segmenter.segment(
        scene.image,
        "toy-3",
        SegmentationOptions(mode="boxes", boxes=boxes, smooth_px=0),
        targets=names,
    )
    by_label = {o.label: o for o in got}
    assert set(by_label) == set(names)
    for obj in scene.objects:
        assert iou(by_label[obj.name].mask, obj.mask) >= 0.85, obj.name
    auto = segmenter.segment(
        scene.image, "toy-3", SegmentationOptions(mode="auto", smooth_px=0, max_objects=10)
    )
    for obj in scene.objects:
        assert max((iou(o.mask, obj.mask) for o in auto), default=0.0) >= 0.8, obj.name
    background = ~np.logical_or.reduce([o.mask for o in scene.objects])
    assert all(iou(o.mask, background) < 0.5 for o in auto)


def test_seg_stage_runs_the_toy_profile(tmp_path, caplog) -> None:
    """GENSEG_MODELS=toy: the worker loads the shipped weights with the toy settings."""
    stage = SegStage(Settings(blob_url=str(tmp_path), models="toy"))
    assert stage.config == SegConfig.for_profile("toy")
    with caplog.at_level(logging.INFO, logger="seg_worker.handler"):
        stage.setup()
    assert stage.predictor.model.image_encoder.img_size == 64
    assert "profile toy, SAM toy, input 64 px" in caplog.text
