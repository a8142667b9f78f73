"""Views of the 3D toy world as training data of the toy SAM (:class:`toy.sam_data.ToyData`).

The toy SAM learns from the flat world's shapes; on the 3D world's shaded solids (a
cube's faces in three shades, shadows on the floor beside them) it splits and merges
objects: exact-box prompts on 120 canonical views gave a mean IoU of 0.76 (median 0.89,
a quarter below 0.56). :func:`with_scene_views` appends random-layout views (one
azimuth each, seeds from :data:`SEED_BASE`, below the evaluation seeds) to a flat
``ToyData``, so one SAM serves both worlds.
"""

from __future__ import annotations

import numpy as np
import torch

from toy.depth_data import render_scenes
from toy.sam_data import ToyData
from toy.world import mask_box

#: Seeds of the SAM's scene views: apart from the depth model's (0..) and the scene
#: generator's (0.. canonical), below the evaluation seeds.
SEED_BASE = 700_000
#: Visible pixels a solid needs to be a training object (one hidden behind another is not).
MIN_AREA = 12


def scene_views(count: int, processes: int = 1) -> ToyData:
    """``count`` random-layout views as ``ToyData`` (objects with at least
    :data:`MIN_AREA` visible pixels; the others count as background)."""
    scenes = render_scenes(range(SEED_BASE, SEED_BASE + count), "random", processes)
    images, owner, masks, boxes, objects = [], [], [], [], []
    for scene in scenes:
        view = scene.views[0]
        own = np.full(view.image.shape[:2], -1, np.int32)
        ids = []
        for mask in view.masks:
            if mask.sum() < MIN_AREA:
                continue
            own[mask] = len(masks)
            ids.append(len(masks))
            masks.append(mask)
            boxes.append(mask_box(mask))
        images.append(view.image)
        owner.append(own)
        objects.append(ids)
    return ToyData(
        torch.from_numpy(np.stack(images)),
        torch.from_numpy(np.stack(owner)),
        torch.from_numpy(np.stack(masks)),
        torch.tensor(boxes, dtype=torch.float32),
        objects,
    )


def concat(first: ToyData, second: ToyData) -> ToyData:
    """``first``'s images then ``second``'s, object indices renumbered."""
    shift = len(first.masks)
    return ToyData(
        torch.cat([first.images, second.images]),
        torch.cat([first.owner, torch.where(second.owner >= 0, second.owner + shift, -1)]),
        torch.cat([first.masks, second.masks]),
        torch.cat([first.boxes, second.boxes]),
        [*first.objects, *([i + shift for i in ids] for ids in second.objects)],
    )


def with_scene_views(data: ToyData, count: int, processes: int = 1) -> ToyData:
    """``data`` with ``count`` views of the 3D toy world appended."""
    return concat(data, scene_views(count, processes)) if count else data


__all__ = ["SEED_BASE", "concat", "scene_views", "with_scene_views"]
