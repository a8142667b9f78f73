"""Are generated scenes scenes? Measured on the 3D toy world (bench/scene_quality.py).

For each evaluation scene (a combination of two or three solids the scene generator
never saw, :func:`toy.world3d.held_out`) the scene generator draws the four views from
their prompts ("..., view from 45 degrees"), one seed shared by the four, as one batch
through the gen worker's :class:`~gen_worker.generate.Generator`. The truth is the
canonical scene of the caption, rendered from the same cameras.

- A target (a solid of the caption) is **found in a view** when the colour search
  (:func:`toy.world.find_object`) finds a region of its colour whose IoU with the
  solid's exact mask in that view is at least 0.5: the right object, where the camera
  would see it. The figure is the share of targets found in at least 3 of the 4 views.
- **Spread**: for a target found in at least two views, each view's estimate of its
  3D position (the found mask, the depth model's metric depth of the generated image,
  the view's camera: :func:`scene_worker.merge.sight`, what the scene stage does),
  the root mean square distance of the estimates from their median, relative to the
  scene's size :data:`SCENE_SIZE`. **Error**: the median's horizontal distance from
  the solid's true middle, relative to the same size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gen_worker.generate import BatchSpec, Generator, Sample
from scene_worker.merge import ViewInput, ViewObject, sight
from seg_worker.depth import DepthEstimator
from toy.world import find_object, iou
from toy.world3d import (
    EVAL_SEED_BASE,
    SLOTS,
    VIEWS,
    caption3d,
    draw_items,
    held_out,
    make_scene3d,
    view_caption,
)

#: The scene's size (world units): the diameter of the circle through the slots.
SCENE_SIZE = 2 * max(math.hypot(x, z) for x, z in SLOTS)
#: IoU with the exact mask from which a colour region is the target, in place.
FOUND_IOU = 0.5


@dataclass(frozen=True)
class EvalScene:
    """One evaluation scene: its seed (also the generation seed of its four views), the
    solids ``[(colour, shape)]`` in caption order, and the caption without a view."""

    seed: int
    items: tuple[tuple[str, str], ...]
    caption: str


def eval_scenes(count: int, *, seed_base: int = EVAL_SEED_BASE) -> list[EvalScene]:
    """The first ``count`` evaluation seeds whose solids are a held-out combination."""
    scenes: list[EvalScene] = []
    seed = seed_base
    while len(scenes) < count:
        items = tuple(draw_items(np.random.default_rng(seed)))
        if held_out(items):
            scenes.append(EvalScene(seed, items, caption3d(items)))
        seed += 1
    return scenes


@dataclass
class TargetOutcome:
    """One target of one scene: per view whether it was found and the IoU of the
    colour region with the exact mask (0 when none), the position estimates of the views
    that found it, and the spread and error relative to :data:`SCENE_SIZE`."""

    caption: str
    target: str
    found: list[bool]
    ious: list[float]
    centres: list[list[float]] = field(default_factory=list)
    spread: float | None = None
    error: float | None = None

    @property
    def found_in_3(self) -> bool:
        return sum(self.found) >= 3


@dataclass(frozen=True)
class GenParams:
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"


def evaluate_scene(
    generator: Generator,
    depth: DepthEstimator,
    scene: EvalScene,
    params: GenParams,
    images_out: list[np.ndarray] | None = None,
) -> list[TargetOutcome]:
    """Generate the four views of ``scene`` and score each of its solids."""
    truth = make_scene3d(scene.seed, items=scene.items)
    names = [f"{c} {s}" for c, s in scene.items]
    spec = BatchSpec("txt2img", 64, 64, params.steps, params.guidance_scale, params.sampler)
    samples = [
        Sample(view_caption(scene.caption, a), scene.seed, targets=tuple(names)) for a in VIEWS
    ]
    results = generator.generate(spec, samples)
    images = [np.asarray(r.image.convert("RGB")) for r in results]
    if images_out is not None:
        images_out.extend(images)
    depths = [depth.estimate(image).values for image in images]
    outcomes = []
    for k, ((colour, _shape), name) in enumerate(zip(scene.items, names, strict=True)):
        outcome = TargetOutcome(scene.caption, name, [], [])
        for i, (azimuth, image) in enumerate(zip(VIEWS, images, strict=True)):
            region = find_object(image, colour)
            score = iou(region, truth.views[i].masks[k]) if region is not None else 0.0
            outcome.ious.append(round(score, 4))
            outcome.found.append(score >= FOUND_IOU)
            if region is not None and score >= FOUND_IOU:
                view = ViewInput(azimuth, image, depths[i], [ViewObject(name, region)])
                seen = sight(view, view.objects[0], i)
                if seen is not None:
                    outcome.centres.append([round(float(v), 4) for v in seen.centre])
        if len(outcome.centres) >= 2:
            centres = np.asarray(outcome.centres)
            middle = np.median(centres, axis=0)
            rms = np.sqrt(((centres - middle) ** 2).sum(axis=1).mean())
            outcome.spread = round(float(rms) / SCENE_SIZE, 4)
            true_centre = truth.solids[k].centre
            horizontal = np.linalg.norm((middle - true_centre)[[0, 2]])
            outcome.error = round(float(horizontal) / SCENE_SIZE, 4)
        outcomes.append(outcome)
    return outcomes


def _mean_ci(values: Sequence[float]) -> dict[str, float | int]:
    """Mean with a 95 % normal-approximation confidence half-width, and the count."""
    arr = np.asarray(values, np.float64)
    if len(arr) == 0:
        return {"mean": 0.0, "ci95": 0.0, "n": 0}
    half = 1.96 * arr.std(ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else 0.0
    return {"mean": round(float(arr.mean()), 4), "ci95": round(float(half), 4), "n": len(arr)}


def summarise(outcomes: Sequence[TargetOutcome]) -> dict[str, object]:
    """The bench's figures over all targets."""
    spreads = [o.spread for o in outcomes if o.spread is not None]
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "targets": len(outcomes),
        "found_in_3_of_4": _mean_ci([float(o.found_in_3) for o in outcomes]),
        "found_per_view": _mean_ci([float(f) for o in outcomes for f in o.found]),
        "spread": {
            **_mean_ci(spreads),
            "median": round(float(np.median(spreads)), 4) if spreads else None,
            "p90": round(float(np.percentile(spreads, 90)), 4) if spreads else None,
            "share_within_0.15": round(float(np.mean(np.asarray(spreads) <= 0.15)), 4)
            if spreads
            else None,
        },
        "position_error": _mean_ci(errors),
        "scene_size": round(SCENE_SIZE, 4),
    }


def run(
    generator: Generator,
    depth: DepthEstimator,
    scenes: Sequence[EvalScene],
    params: GenParams,
    on_progress: Callable[[int, int], None] | None = None,
    images_out: list[np.ndarray] | None = None,
) -> list[TargetOutcome]:
    """Every target of every scene."""
    outcomes: list[TargetOutcome] = []
    for done, scene in enumerate(scenes, 1):
        outcomes += evaluate_scene(generator, depth, scene, params, images_out)
        if on_progress is not None:
            on_progress(done, len(scenes))
    return outcomes


__all__ = [
    "SCENE_SIZE",
    "EvalScene",
    "GenParams",
    "TargetOutcome",
    "eval_scenes",
    "evaluate_scene",
    "run",
    "summarise",
]
