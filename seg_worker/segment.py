"""Segmentation of one image, without Kafka or blobs: image + options + heat maps -> objects.

Three steps, so a batch of images can share encoder passes:

1. :meth:`Segmenter.plan` turns the request into prompts per target (heat maps,
   boxes or points) or text concepts, notes which targets fall back to the
   automatic mode, and lists the image views to encode (one per pyramid scale);
   a mode the backend does not serve raises :class:`UnsupportedMode`;
2. :meth:`Segmenter.embed` encodes the views of several plans (cache first);
3. :meth:`Segmenter.run` predicts, merges the pyramid, retries small objects on
   a crop, runs the automatic mode and the concept queries, and finishes the objects.

The model work goes through a :class:`~seg_worker.backend.SegBackend` (``predictor``):
segment-anything, SAM 2.1 or SAM 3.

:meth:`Segmenter.segment` does all three for one image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas import SegmentationOptions
from seg_worker.backend import SegBackend, UnsupportedMode
from seg_worker.concept import ConceptGroup, concept_candidates
from seg_worker.config import SegConfig
from seg_worker.embedding import Embedding, EmbedKey
from seg_worker.finishing import Candidate, SegObject, passes, select_objects
from seg_worker.prompts import (
    Prompt,
    box_prompts,
    crop_around,
    heatmap_prompts,
    point_prompts,
    resize_heatmap,
)
from seg_worker.pyramid import predict_pyramid, view_items

log = logging.getLogger(__name__)

#: Label of objects from the automatic mode when no single target owns them.
AUTO_LABEL = "object"


@dataclass(eq=False)
class TargetGroup:
    """The prompts of one target (or of the explicit boxes/points)."""

    name: str
    prompts: list[Prompt]
    heat: np.ndarray | None = None  # [H, W] heat map at image size, for the crop retry


@dataclass(eq=False)
class Plan:
    """What to do for one image; ``embeddings`` is filled by :meth:`Segmenter.embed`."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    sha256: str
    options: SegmentationOptions
    groups: list[TargetGroup]
    auto_label: str | None  # run the automatic mode, labelling its masks so
    views: list[tuple[EmbedKey, Callable[[], np.ndarray]]]
    embeddings: dict[EmbedKey, Embedding] = field(default_factory=dict)
    concepts: list[ConceptGroup] = field(default_factory=list)  # concept modes

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


class Segmenter:
    """Segmentation of images with a shared backend and its embedding cache."""

    def __init__(self, predictor: SegBackend, config: SegConfig | None = None) -> None:
        self.predictor = predictor
        self.config = config or SegConfig()

    @property
    def backend(self) -> SegBackend:
        return self.predictor

    @property
    def mask_threshold(self) -> float:
        return float(self.predictor.mask_threshold)

    # --- 1. plan -------------------------------------------------------------------

    def plan(
        self,
        image: np.ndarray,
        sha256: str,
        options: SegmentationOptions,
        *,
        targets: Sequence[str] = (),
        heatmaps: Mapping[str, np.ndarray] | None = None,
        missing_targets: Sequence[str] = (),
    ) -> Plan:
        """Prompts and views for ``image`` ``[H, W, 3]`` uint8 RGB.

        ``heatmaps``: target -> float heat map ``[h, w]`` in 0..1 at any resolution
        with the image's aspect ratio. In ``attention`` mode a target without a heat
        map (listed in ``missing_targets`` or simply absent) falls back to the
        automatic mode; the automatic pass runs once per image, its masks labelled
        with that target, or :data:`AUTO_LABEL` when several targets fall back. In the
        concept modes each target is a phrase (``attention+concept`` re-ranks by its
        heat map when there is one); they run at scale 1.0 only.

        Raises :class:`UnsupportedMode` when the backend does not serve the mode.
        """
        if options.mode not in self.predictor.modes:
            raise UnsupportedMode(options.mode, self.predictor.name)
        height, width = image.shape[:2]
        heatmaps = heatmaps or {}
        groups: list[TargetGroup] = []
        auto_names: list[str] = []
        concepts: list[ConceptGroup] = []
        if options.mode in ("concept", "attention+concept"):
            for name in dict.fromkeys(targets):
                heat = None
                if options.mode == "attention+concept" and name in heatmaps:
                    heat = resize_heatmap(heatmaps[name], height, width)
                concepts.append(ConceptGroup(name, heat))
        elif options.mode == "attention":
            names = list(dict.fromkeys([*targets, *heatmaps]))  # targets first, deduped
            for name in names:
                if name not in heatmaps:
                    if name not in missing_targets:
                        log.warning("no heat map for target %r: automatic mode", name)
                    auto_names.append(name)
                    continue
                heat = resize_heatmap(heatmaps[name], height, width)
                prompts = heatmap_prompts(
                    heat,
                    name,
                    threshold=self.config.heat_threshold,
                    max_prompts=options.max_objects,
                )
                groups.append(TargetGroup(name, prompts, heat))
        elif options.mode == "boxes":
            groups.append(
                TargetGroup("boxes", box_prompts(options.boxes or [], targets, height, width))
            )
        elif options.mode == "points":
            groups.append(TargetGroup("points", point_prompts(options.points or [], targets)))
        auto_label: str | None = None
        if options.mode == "auto":
            auto_label = targets[0] if len(targets) == 1 else AUTO_LABEL
        elif auto_names:
            auto_label = auto_names[0] if len(auto_names) == 1 else AUTO_LABEL

        views: list[tuple[EmbedKey, Callable[[], np.ndarray]]] = []
        if any(g.prompts or g.heat is not None for g in groups):
            views += view_items(image, sha256, options.scales)
        if auto_label is not None or concepts:
            views.append(((sha256, 1.0, None), lambda: image))
        return Plan(image, sha256, options, groups, auto_label, views, concepts=concepts)

    # --- 2. embed ------------------------------------------------------------------

    def embed(self, plans: Sequence[Plan]) -> None:
        """Encode every view of ``plans`` (cache hits are free), in encoder batches of
        ``config.encode_batch``; the embeddings are pinned in each plan, so a cache
        eviction between this step and :meth:`run` cannot cost a second encode."""
        items = [item for plan in plans for item in plan.views]
        embeddings = self.predictor.embed_many(items, batch_size=self.config.encode_batch)
        for (key, _), emb in zip(items, embeddings, strict=True):
            for plan in plans:
                if any(k == key for k, _ in plan.views):
                    plan.embeddings[key] = emb

    # --- 3. run --------------------------------------------------------------------

    def run(self, plan: Plan) -> list[SegObject]:
        """Predict, retry small objects, run the automatic mode, finish: the objects of
        ``plan``, highest score first."""
        options = plan.options
        candidates: list[Candidate] = []
        for group in plan.groups:
            got = [self._predict(plan, prompt) for prompt in group.prompts]
            if (
                group.heat is not None
                and self.config.crop_retry
                and not any(passes(c, options.min_confidence) for c in got)
            ):
                got += self._retry_on_crop(plan, group)
            candidates += got
        if plan.auto_label is not None:
            candidates += self._automatic(plan, plan.auto_label)
        for concept in plan.concepts:
            candidates += self._concept(plan, concept)
        return select_objects(
            candidates,
            min_confidence=options.min_confidence,
            max_objects=options.max_objects,
            smooth_px=options.smooth_px,
        )

    def segment(
        self,
        image: np.ndarray,
        sha256: str,
        options: SegmentationOptions,
        *,
        targets: Sequence[str] = (),
        heatmaps: Mapping[str, np.ndarray] | None = None,
        missing_targets: Sequence[str] = (),
    ) -> list[SegObject]:
        """Plan, embed and run for one image."""
        plan = self.plan(
            image,
            sha256,
            options,
            targets=targets,
            heatmaps=heatmaps,
            missing_targets=missing_targets,
        )
        self.embed([plan])
        return self.run(plan)

    def _embedding(self, plan: Plan, key: EmbedKey) -> Embedding:
        emb = plan.embeddings.get(key)
        if emb is None:  # run() without embed(): encode now (cached)
            view = next(v for k, v in plan.views if k == key)
            emb = plan.embeddings[key] = self.predictor.embed(key, view)
        return emb

    def _predict(self, plan: Plan, prompt: Prompt) -> Candidate:
        """Best multimask output of ``prompt`` over the pyramid, thresholded."""
        embs = [self._embedding(plan, (plan.sha256, float(s), None)) for s in plan.options.scales]
        merged = predict_pyramid(self.predictor, embs, prompt, plan.size)
        mask = (merged.logits > self.mask_threshold).numpy()
        return Candidate(prompt.label, merged.score, mask)

    def _retry_on_crop(self, plan: Plan, group: TargetGroup) -> list[Candidate]:
        """One more try for a small object: SAM on a crop around the heat-map peak.

        The crop (see :func:`crop_around`) is upscaled to the encoder's input size by
        the predictor's own resize, so a small object covers many more patches.
        Single scale: the crop already is the zoomed view.
        """
        assert group.heat is not None
        height, width = plan.size
        if float(group.heat.max(initial=0.0)) <= 0.0:
            return []  # a flat heat map has no peak to zoom on
        py, px = np.unravel_index(int(np.argmax(group.heat)), group.heat.shape)
        region = group.prompts[0].box if group.prompts else None
        x0, y0, x1, y1 = crop_around(
            (float(px), float(py)), region, height, width, min_side=self.config.crop_min_side
        )
        if (x1 - x0, y1 - y0) == (width, height):
            return []  # the crop would be the image itself: nothing new to see
        log.info("target %r: nothing passed, retrying on crop %s", group.name, (x0, y0, x1, y1))
        view = np.ascontiguousarray(plan.image[y0:y1, x0:x1])
        emb = self.predictor.embed((plan.sha256, 1.0, (x0, y0, x1, y1)), view)
        box = None
        if region is not None:
            bx0, by0 = max(region[0], x0), max(region[1], y0)
            bx1, by1 = min(region[2], x1), min(region[3], y1)
            if bx1 > bx0 and by1 > by0:
                box = np.array([bx0, by0, bx1, by1], np.float32)
        prompt = Prompt(
            group.name,
            points=np.array([[px, py]], np.float32),
            point_labels=np.ones((1,), np.int32),
            box=box,
        ).shifted(x0, y0)
        merged = predict_pyramid(self.predictor, [emb], prompt, (y1 - y0, x1 - x0))
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = (merged.logits > self.mask_threshold).numpy()
        return [Candidate(group.name, merged.score, mask)]

    def _automatic(self, plan: Plan, label: str) -> list[Candidate]:
        """The backend's automatic mode on the full image (scale 1.0, cached embedding)."""
        emb = self._embedding(plan, (plan.sha256, 1.0, None))
        found = self.predictor.automatic(
            emb,
            plan.image,
            points_per_side=self.config.auto_points_per_side,
            points_per_batch=self.config.auto_points_per_batch,
            pred_iou_thresh=plan.options.min_confidence,
            stability_thresh=self.config.auto_stability_thresh,
        )
        return [Candidate(label, score, mask) for score, mask in found]

    def _concept(self, plan: Plan, group: ConceptGroup) -> list[Candidate]:
        """SAM 3's instances of one phrase (scale 1.0), re-ranked by heat when given."""
        emb = self._embedding(plan, (plan.sha256, 1.0, None))
        # More than max_objects: smoothing may empty some, re-ranking may promote any.
        instances = self.predictor.concept(
            emb,
            group.name,
            plan.size,
            min_score=plan.options.min_confidence,
            max_instances=max(plan.options.max_objects, self.config.concept_candidates),
        )
        return concept_candidates(group, instances, min_heat=self.config.concept_min_heat)
