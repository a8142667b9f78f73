"""The toy world's masks match its drawings (toy/world.py)."""

from __future__ import annotations

import numpy as np
import pytest

from toy.world import (
    EVAL_SEED_BASE,
    PALETTE,
    classify_shape,
    colour_labels,
    coverage,
    find_object,
    iou,
    make_scene,
)

SEEDS = [*range(100), *range(EVAL_SEED_BASE, EVAL_SEED_BASE + 100)]


def test_scenes_are_deterministic() -> None:
    a, b = make_scene(7), make_scene(7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))
    assert not np.array_equal(make_scene(8).image, a.image)


@pytest.mark.parametrize("seed", SEEDS[::20])
def test_masks_are_where_the_colour_is_drawn(seed: int) -> None:
    """Each mask is exactly the pixels of its object's colour, and masks never overlap."""
    scene = make_scene(seed)
    labels = colour_labels(scene.image)
    names = list(PALETTE)
    drawn = np.full(scene.image.shape[:2], -1)
    for obj in scene.objects:
        assert obj.mask.any()
        assert not (drawn[obj.mask] >= 0).any(), "objects overlap"
        drawn[obj.mask] = names.index(obj.colour)
    assert np.array_equal(labels, drawn)


def test_colour_search_recovers_every_object_and_shape() -> None:
    """On 200 scenes (training and evaluation seeds) the colour search finds each drawn
    object's mask exactly and the shape classifier names its shape."""
    objects = 0
    for seed in SEEDS:
        scene = make_scene(seed)
        for obj in scene.objects:
            found = find_object(scene.image, obj.colour)
            assert found is not None, (seed, obj.name)
            assert iou(found, obj.mask) == 1.0, (seed, obj.name)
            shape, score = classify_shape(found)
            assert shape == obj.shape, (seed, obj.name, shape, score)
            x0, y0, x1, y1 = obj.box
            assert obj.mask[y0:y1, x0:x1].sum() == obj.mask.sum()
            objects += 1
        for colour in set(PALETTE) - {o.colour for o in scene.objects}:
            assert find_object(scene.image, colour) is None, (seed, colour)
    assert objects >= 300


def test_colour_search_prefers_the_asked_shape() -> None:
    """Two red objects (as a generator may draw): the asked shape wins over the larger one."""
    grey = np.full((64, 64, 3), 150.0, np.float32)
    red = np.asarray(PALETTE["red"], np.float32)
    image = grey
    masks = {}
    for shape, (cx, cy, r) in {"circle": (18, 18, 12), "square": (46, 46, 8)}.items():
        cov = coverage(shape, cx, cy, r, 64)[:, :, None]
        image = image * (1 - cov) + red * cov
        masks[shape] = cov[:, :, 0] >= 0.5
    pixels = np.rint(image).astype(np.uint8)
    assert iou(find_object(pixels, "red"), masks["circle"]) == 1.0  # the largest
    assert iou(find_object(pixels, "red", "square"), masks["square"]) == 1.0
    assert iou(find_object(pixels, "red", "star"), masks["circle"]) == 1.0  # none: largest
