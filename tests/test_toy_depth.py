"""The toy depth model: a Depth Anything of the transformers classes, trained on the 3D toy
world's exact depth maps, saved with save_pretrained and loaded through the ``pretrained``
depth path (seg_worker/depth.py); the shipped weights' accuracy on held-out views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import DepthAnythingForDepthEstimation

from plumbing.revisions import revision_of
from plumbing.settings import Settings
from seg_worker import SegStage
from seg_worker.depth import DepthEstimator, depth_model_of, encode_depth_png, load_depth
from toy.depth_data import depth_views
from toy.depth_eval import depth_errors
from toy.depth_model import MAX_DEPTH, DepthTrainConfig, build_depth_model, depth_processor
from toy.scene_weights import DEPTH_DIR
from toy.train_depth import degrade, train
from toy.world3d import EVAL_SEED_BASE, make_scene3d


def test_the_model_is_a_metric_depth_anything_of_64_px() -> None:
    model = build_depth_model()
    assert isinstance(model, DepthAnythingForDepthEstimation)
    assert model.config.depth_estimation_type == "metric" and model.config.max_depth == MAX_DEPTH
    estimator = DepthEstimator(model.eval(), depth_processor())
    view = make_scene3d(0).views[0]
    depth = estimator.estimate(view.image)
    assert depth.units == "metres" and depth.scale == MAX_DEPTH
    assert depth.values.shape == (64, 64) and (depth.values > 0).all()


def test_degradations_keep_images_in_range_and_change_them() -> None:
    images = torch.from_numpy(make_scene3d(1).views[0].image).permute(2, 0, 1)[None].float()
    out = degrade(images.repeat(4, 1, 1, 1), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 64, 64) and out.min() >= 0 and out.max() <= 255
    assert (out - images).abs().mean() > 1.0


def test_training_lowers_the_error_and_saves_what_load_depth_reads(
    tmp_path: Path, restore_threads
) -> None:
    """A short run: the held-out AbsRel falls below the untrained model's, and the saved
    directory loads through the pretrained path to the same predictions."""
    cfg = DepthTrainConfig(
        threads=1, random_views=48, canonical_scenes=4, steps=40, batch=8, lr=2e-3,
        warmup=5, eval_views=8, log_every=10,
    )  # fmt: skip
    held_out = depth_views(range(EVAL_SEED_BASE, EVAL_SEED_BASE + 8), ())
    untrained = depth_errors(
        DepthEstimator(build_depth_model(cfg).eval(), depth_processor()), held_out
    )
    out = tmp_path / "depth"
    errors = train(out, cfg)
    assert errors["abs_rel"] < untrained["abs_rel"]
    record = json.loads((out / "train_config.json").read_text())
    assert record["held_out"] == errors and record["recipe"]["steps"] == 40

    loaded = load_depth("pretrained", str(out))
    assert type(loaded.model).__name__ == "DepthAnythingForDepthEstimation"
    assert loaded.units == "metres"
    assert depth_errors(loaded, held_out) == errors


def test_the_shipped_depth_model_meets_its_target_on_held_out_views() -> None:
    """The shipped weights on 40 held-out random-layout views: AbsRel at most 0.10 (the
    issue's target), and a depth PNG of one of them keeps metres."""
    estimator = load_depth("pretrained", str(DEPTH_DIR))
    views = depth_views(range(EVAL_SEED_BASE + 500, EVAL_SEED_BASE + 540), ())
    errors = depth_errors(estimator, views)
    assert errors["abs_rel"] <= 0.10, errors
    depth = estimator.estimate(views.images[0].numpy())
    png = encode_depth_png(depth)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    true = views.depth[0].numpy()
    assert np.corrcoef(depth.values.ravel(), true.ravel())[0, 1] > 0.9


def test_the_toy_profile_runs_the_shipped_depth_model_unless_depth_model_is_set(
    tmp_path: Path,
) -> None:
    """``GENSEG_MODELS=toy`` loads ``toy/weights/depth`` (its revision is the directory's
    hash, its depth metric); ``DEPTH_MODEL`` set explicitly wins; other profiles keep
    ``DEPTH_MODEL``'s default."""
    toy = Settings(models="toy", blob_url=str(tmp_path / "blobs"))
    assert depth_model_of(toy) == str(DEPTH_DIR)
    other = tmp_path / "other-depth"
    assert depth_model_of(toy.model_copy(update={"depth_model": str(other)})) == str(other)
    assert depth_model_of(Settings(models="pretrained")) == Settings().depth_model

    stage = SegStage(toy)
    assert stage.depth.units == "metres"
    assert stage.depth_revision == revision_of(str(DEPTH_DIR))
    scene = make_scene3d(EVAL_SEED_BASE + 7)
    view = scene.views[0]
    depth = stage.depth.estimate(view.image)
    assert np.corrcoef(depth.values.ravel(), view.depth.ravel())[0, 1] > 0.9
