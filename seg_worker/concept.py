"""Text-concept modes (``concept``, ``attention+concept``): SAM 3 instances -> candidates.

``concept``: each target is a noun phrase; every instance SAM 3 finds with a score
of at least ``min_confidence`` is a candidate, labelled with the target, ranked by
that score (like any other mode's candidates).

``attention+concept``: the same instances, re-ranked by the share of the target's
heat map (the generator's cross-attention for the target's tokens) each holds:
``sum(heat * mask) / sum(heat)``, in 0..1. When the concept matches several objects
(two cups), the one the generator drew for the word comes first; instances holding
less than ``SegConfig.concept_min_heat`` of the heat (the other cup) are dropped.
The objects' ``score`` stays SAM 3's confidence; only the order and the selection
change. A target without a heat map falls back to ``concept`` (all instances by
score), as ``attention`` falls back to the automatic mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seg_worker.backend import Instance
from seg_worker.finishing import Candidate


@dataclass(eq=False)
class ConceptGroup:
    """One target of a concept mode: its phrase, and its heat map when re-ranking."""

    name: str
    heat: np.ndarray | None = None  # [H, W] float at image size (attention+concept)


def heat_share(heat: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of ``heat`` ``[H, W]`` (>= 0) inside ``mask`` ``[H, W]`` bool; 0 for a
    flat zero heat map."""
    total = float(heat.sum(dtype=np.float64))
    if total <= 0.0 or not np.isfinite(total):
        return 0.0
    return float(heat[mask].sum(dtype=np.float64)) / total


def concept_candidates(
    group: ConceptGroup, instances: list[Instance], *, min_heat: float
) -> list[Candidate]:
    """Candidates of one target's instances: as found (``concept``, or no heat map), or
    re-ranked by :func:`heat_share` and those under ``min_heat`` dropped."""
    if group.heat is None:
        return [Candidate(group.name, inst.score, inst.mask) for inst in instances]
    out = []
    for inst in instances:
        share = heat_share(group.heat, inst.mask)
        if share >= min_heat:
            out.append(Candidate(group.name, inst.score, inst.mask, rank=share))
    return out
