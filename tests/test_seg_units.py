"""Unit tests of the segmenter's pure parts and model profiles (tiny SAM, CPU)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry

from plumbing.images import mask_bbox, rgba_asset
from schemas import Point
from seg_worker.finishing import (
    DUPLICATE_IOU,
    Candidate,
    decode_rle,
    encode_rle,
    mask_iou,
    select_objects,
    smooth_mask,
)
from seg_worker.predictor import CachedPredictor, Embedding, EmbeddingCache
from seg_worker.profiles import ARCHS, build_sam, load_sam, sam_with_weights
from seg_worker.prompts import (
    box_prompts,
    crop_around,
    heatmap_prompts,
    point_prompts,
    resize_heatmap,
)
from seg_worker.pyramid import predict_pyramid, view_items

torch.set_num_threads(2)


# --- prompts ------------------------------------------------------------------------


def two_blob_heatmap() -> np.ndarray:
    """A 16x20 latent-resolution heat map: a strong blob top-left, a weaker one bottom-right."""
    heat = np.zeros((16, 20), np.float32)
    heat[2:6, 3:7] = 1.0  # mass 16
    heat[10:13, 14:18] = 0.7  # mass 8.4
    return heat


def test_heatmap_with_two_blobs_gives_two_boxes_in_place() -> None:
    heat = resize_heatmap(two_blob_heatmap(), 128, 160)  # x8, like latents to pixels
    prompts = heatmap_prompts(heat, "cup")
    assert len(prompts) == 2
    first, second = prompts
    assert first.weight > second.weight  # most attended first
    # bilinear upsampling blurs the edges by up to a cell: boxes within 8 px of x8 cells
    np.testing.assert_allclose(first.box, [24, 16, 56, 48], atol=8)
    np.testing.assert_allclose(second.box, [112, 80, 144, 104], atol=8)
    for p in prompts:
        x, y = p.points[0]
        assert p.box[0] <= x < p.box[2] and p.box[1] <= y < p.box[3]
        assert p.point_labels.tolist() == [1] and p.label == "cup"


def test_heatmap_threshold_and_limits() -> None:
    heat = two_blob_heatmap()
    # the weaker blob (0.7 of peak) disappears at a 0.8 threshold
    assert len(heatmap_prompts(heat, "t", threshold=0.8)) == 1
    assert len(heatmap_prompts(heat, "t", max_prompts=1)) == 1
    assert heatmap_prompts(np.zeros((8, 8), np.float32), "t") == []


def test_box_and_point_prompts() -> None:
    boxes = box_prompts([[10, 10, 20, 30], [150, 0, 50, 50], [500, 500, 5, 5]], ["a"], 100, 160)
    assert [p.label for p in boxes] == ["a", "box-1"]  # the third lies outside: dropped
    np.testing.assert_array_equal(boxes[0].box, [10, 10, 30, 40])
    np.testing.assert_array_equal(boxes[1].box, [150, 0, 160, 50])  # clipped
    points = point_prompts([Point(x=5, y=6), Point(x=1, y=1, label=0), Point(x=50, y=60)], ["cup"])
    assert [p.label for p in points] == ["cup", "point-1"]
    np.testing.assert_array_equal(points[1].points, [[50, 60], [1, 1]])
    np.testing.assert_array_equal(points[1].point_labels, [1, 0])


def test_crop_around_stays_inside() -> None:
    x0, y0, x1, y1 = crop_around((2.0, 3.0), np.array([0, 0, 6, 6]), 100, 200, min_side=16)
    assert (x0, y0) == (0, 0) and x1 - x0 == y1 - y0 == 25  # long side / 8
    x0, y0, x1, y1 = crop_around((199.0, 99.0), None, 100, 200, min_side=16)
    assert (x1, y1) == (200, 100)


# --- finishing ----------------------------------------------------------------------


def test_smoothing_removes_specks_keeps_bodies() -> None:
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True
    mask[50, 50] = True  # a one-pixel speck
    out = smooth_mask(mask, 2)
    assert not out[50, 50]
    assert out[12:38, 12:38].all() and not out[0:5].any()
    assert not out[10, 10]  # a corner is rounded
    np.testing.assert_array_equal(smooth_mask(mask, 0), mask)


def test_smoothing_the_box_equals_smoothing_the_frame() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    mask = np.zeros((80, 90), bool)
    mask[30:60, 0:40] = rng.random((30, 40)) > 0.3  # touches the left border
    full = ndimage.gaussian_filter(mask.astype(np.float32), sigma=3, mode="nearest") >= 0.5
    np.testing.assert_array_equal(smooth_mask(mask, 3), full)


def test_select_objects_filters_orders_and_caps() -> None:
    def square(x: int) -> np.ndarray:
        m = np.zeros((32, 32), bool)
        m[4:14, x : x + 8] = True
        return m

    cands = [
        Candidate("a", 0.5, square(0)),
        Candidate("b", 0.95, square(10)),
        Candidate("c", 0.85, square(20)),
        Candidate("d", 0.99, np.zeros((32, 32), bool)),  # empty: dropped
    ]
    out = select_objects(cands, min_confidence=0.8, max_objects=5, smooth_px=0)
    assert [o.label for o in out] == ["b", "c"]
    assert out[0].bbox == (10, 4, 8, 10) and out[0].area == 80
    out = select_objects(cands, min_confidence=0.0, max_objects=2, smooth_px=0)
    assert [o.label for o in out] == ["b", "c"]  # highest first, empty skipped, capped
    assert select_objects(cands, min_confidence=1.0, max_objects=5, smooth_px=0) == []


def test_select_objects_drops_duplicates_of_one_label() -> None:
    """Two prompts of one target on one object give one object (the better-scored), as
    do two automatic-mode grid points; objects of different labels are never merged, and
    an object overlapping another at exactly IoU 0.5 stays."""

    def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        m = np.zeros((40, 40), bool)
        m[y0:y1, x0:x1] = True
        return m

    body = box(5, 5, 25, 25)  # 400 px
    cands = [
        Candidate("red circle", 0.90, box(5, 5, 25, 24)),  # heat region 1: IoU 0.95
        Candidate("red circle", 0.93, body),  # heat region 2, the best on the body
        Candidate("red circle", 0.89, box(5, 5, 25, 15)),  # IoU 0.5: not a duplicate
        Candidate("blue square", 0.91, box(6, 6, 24, 24)),  # another target on the body
        Candidate("object", 0.95, box(30, 30, 38, 38)),  # automatic mode, twice
        Candidate("object", 0.85, box(30, 30, 38, 37)),
    ]
    assert mask_iou(cands[2].mask, body) == DUPLICATE_IOU
    out = select_objects(cands, min_confidence=0.8, max_objects=9, smooth_px=0)
    assert [(o.label, o.score) for o in out] == [
        ("object", 0.95),
        ("red circle", 0.93),
        ("blue square", 0.91),
        ("red circle", 0.89),
    ]
    for i, a in enumerate(out):
        same = [b for b in out[i + 1 :] if b.label == a.label]
        assert all(mask_iou(a.mask, b.mask) <= DUPLICATE_IOU for b in same)
    # The cap counts objects kept, not duplicates dropped.
    capped = select_objects(cands[:2] + cands[3:4], min_confidence=0.8, max_objects=2, smooth_px=0)
    assert [(o.label, o.score) for o in capped] == [("red circle", 0.93), ("blue square", 0.91)]
    # max_iou 1.0 turns suppression off: every candidate is an object.
    every = select_objects(cands, min_confidence=0.8, max_objects=9, smooth_px=0, max_iou=1.0)
    assert len(every) == 6


def test_rle_round_trip() -> None:
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 13), (64, 48)]:
        mask = rng.random(shape) > 0.5
        rle = encode_rle(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(rle), mask)


def test_rgba_alpha_is_the_mask_and_transparent_outside() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(1, 255, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:20, 10:30] = True
    full = rgba_asset(image, mask, None)
    np.testing.assert_array_equal(full[..., 3], np.where(mask, 255, 0))
    np.testing.assert_array_equal(full[mask, :3], image[mask])
    assert not full[~mask].any()  # colour zeroed too
    box = mask_bbox(mask)
    assert box == (10, 5, 20, 15)
    cropped = rgba_asset(image, mask, box)
    assert cropped.shape == (15, 20, 4) and (cropped[..., 3] == 255).all()


# --- cache --------------------------------------------------------------------------


def test_embedding_cache_is_lru_and_bounded_in_bytes() -> None:
    def emb() -> Embedding:
        return Embedding(torch.zeros(1, 4, 4, 4), (4, 4), (4, 4))  # 256 bytes

    cache = EmbeddingCache(max_bytes=600)
    cache.put(("a", 1.0, None), emb())
    cache.put(("b", 1.0, None), emb())
    assert cache.get(("a", 1.0, None)) is not None  # a is now the most recent
    cache.put(("c", 1.0, None), emb())  # 768 > 600: evicts b, the least recent
    assert ("b", 1.0, None) not in cache and ("a", 1.0, None) in cache
    assert cache.bytes == 512 and cache.evictions == 1
    cache.put(("huge", 1.0, None), Embedding(torch.zeros(1, 400), (1, 1), (1, 1)))
    assert ("huge", 1.0, None) not in cache and len(cache) == 2


# --- profiles -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_full_architectures_match_segment_anything(arch: str) -> None:
    """Our builder makes exactly the official models (so official checkpoints load)."""
    with torch.device("meta"):
        ours = build_sam(arch).state_dict()
        theirs = sam_model_registry[arch]().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_tiny_is_deterministic_and_uses_a_smaller_input() -> None:
    a, b = build_sam("tiny"), build_sam("tiny")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.image_encoder.img_size == ARCHS["tiny"].img_size == 256
    assert not torch.equal(
        build_sam("tiny", seed=1).mask_decoder.iou_token.weight, a.mask_decoder.iou_token.weight
    )


def test_pretrained_round_trip(tmp_path) -> None:
    source = build_sam("tiny", seed=7)
    with torch.no_grad():  # make the weights differ from any seeded init
        source.mask_decoder.iou_token.weight.add_(1.0)
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = load_sam("pretrained", "tiny", checkpoint=str(path))
    for (name, pa), pb in zip(
        source.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    outs = []
    for model in (source, loaded):
        predictor = CachedPredictor(model)
        emb = predictor.embed(("x", 1.0, None), image)
        outs.append(
            predictor.predict_logits(
                emb,
                points=np.array([[10, 10]]),
                point_labels=np.array([1]),
                box=None,
                out_size=(64, 80),
            )
        )
    torch.testing.assert_close(outs[0][0], outs[1][0])


def test_weights_are_taken_not_initialised_and_copied() -> None:
    source = build_sam("tiny", seed=7)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"].half()
    loaded = sam_with_weights("tiny", state)
    taken = loaded.image_encoder.patch_embed.proj.weight
    assert taken.data_ptr() == state["image_encoder.patch_embed.proj.weight"].data_ptr()
    # a half-precision tensor is cast to the model's fp32, not taken as it is
    assert loaded.mask_decoder.iou_token.weight.dtype == torch.float32
    for (name, built), (_, got) in zip(
        source.named_buffers(), loaded.named_buffers(), strict=True
    ):  # pixel_mean and pixel_std included, which no checkpoint holds
        assert not got.is_meta and torch.equal(built, got), name
    assert not loaded.training and not taken.requires_grad


def test_pretrained_refuses_wrong_architecture_and_pickled_code(tmp_path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit architecture"):
        load_sam("pretrained", "vit_b", checkpoint=str(path))
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_sam("pretrained", "tiny", checkpoint=str(evil))
    with pytest.raises(ValueError, match="SAM_CHECKPOINT"):
        load_sam("pretrained", "tiny", checkpoint=None)


class _Evil:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""


# --- predictor and pyramid ----------------------------------------------------------


def test_pyramid_merges_scales_into_full_size_logits() -> None:
    predictor = CachedPredictor(build_sam("tiny"))
    image = np.random.default_rng(3).integers(0, 255, (96, 120, 3), dtype=np.uint8)
    views = view_items(image, "sha", [0.5, 0.75, 1.0])
    embs = predictor.embed_many(views, batch_size=2)
    assert predictor.encoder_images == 3 and predictor.encoder_batches == 2
    assert [e.original_size for e in embs] == [(48, 60), (72, 90), (96, 120)]
    prompts = heatmap_prompts(resize_heatmap(two_blob_heatmap(), 96, 120), "t")
    merged = predict_pyramid(predictor, embs, prompts[0], (96, 120))
    assert merged.logits.shape == (96, 120) and merged.scores.shape == (3,)
    singles = [
        predictor.predict_logits(
            e,
            points=prompts[0].points,
            point_labels=prompts[0].point_labels,
            box=prompts[0].box,
            out_size=(96, 120),
        )
        for e in embs
    ]
    mean_scores = sum(s[1] for s in singles) / 3
    np.testing.assert_allclose(merged.scores, mean_scores, rtol=1e-5)
    assert merged.best == int(np.argmax(mean_scores))  # the best of the multimask outputs
    torch.testing.assert_close(merged.logits, sum(s[0][merged.best] for s in singles) / 3)
    predictor.embed_many(views)  # all cached now
    assert predictor.encoder_images == 3


def test_embedding_size_counts_every_feature_level() -> None:
    """SAM 2.1's embedding is three feature levels; the cache bounds them all."""
    levels = (torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 1, 1))
    emb = Embedding(levels, (4, 4), (4, 4))
    assert emb.nbytes == (32 + 16 + 8) * 4
    cache = EmbeddingCache(max_bytes=2 * emb.nbytes)
    for key in ("a", "b", "c"):
        cache.put((key, 1.0, None), emb)
    assert len(cache) == 2 and cache.bytes == 2 * emb.nbytes and cache.evictions == 1
