"""Worker-side knobs of the segmenter that are not part of the request contract."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from seg_worker.profiles import seg_profile
from seg_worker.prompts import HEAT_THRESHOLD


@dataclass(frozen=True)
class SegConfig:
    """Tuning of one segmenter process (the request's own options come in its event)."""

    #: Memory bound of the embedding cache, bytes (a ViT embedding is 4 MiB in fp32).
    cache_bytes: int = 256 * 2**20
    #: Cache misses encoded together in one encoder forward pass.
    encode_batch: int = 4
    #: Heat-map threshold as a fraction of its peak (see seg_worker.prompts).
    heat_threshold: float = HEAT_THRESHOLD
    #: Retry a target that yielded nothing on a crop around its heat-map peak.
    crop_retry: bool = True
    #: Smallest side of that crop, pixels (the predictor upscales it to the encoder input).
    crop_min_side: int = 32
    #: SamAutomaticMaskGenerator grid: points_per_side**2 point prompts per image.
    auto_points_per_side: int = 16
    auto_points_per_batch: int = 64
    #: SamAutomaticMaskGenerator's stability filter (0 disables it).
    auto_stability_thresh: float = 0.92
    #: attention+concept: instances holding less of the target's heat are dropped (0..1).
    concept_min_heat: float = 0.1
    #: Concept modes: SAM 3 instances looked at per target (at least max_objects).
    concept_candidates: int = 20
    #: SAM architecture of the segment-anything backend; None: Settings.sam_model (a profile
    #: with its own ignores it).
    arch: str | None = None
    #: Seed of random initialisation (tiny and random profiles).
    seed: int = 0

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> SegConfig:
        """Defaults, then what the model profile sets (``SegProfile.config``: the ``tiny``
        profile's small grid, a plug-in's own), then ``overrides``.

        Raises ValueError for an unknown profile (see :func:`seg_worker.profiles.seg_profile`).
        """
        return replace(cls(), **{**seg_profile(profile).config, **overrides})
