"""When a scene is complete, and its scene-ready event. Pure functions of view records."""

from __future__ import annotations

from schemas import BlobRef, SceneReadyEvent, SceneViewRecord


def is_complete(records: list[SceneViewRecord], views_total: int) -> bool:
    """``views_total`` distinct views, each with all of its ``num_images`` images."""
    images: dict[str, set[int]] = {}
    wanted: dict[str, int] = {}
    for rec in records:
        images.setdefault(rec.view.view, set()).add(rec.view.image_index)
        wanted[rec.view.view] = rec.num_images
    return len(images) >= views_total and all(
        set(range(wanted[view])) <= indices for view, indices in images.items()
    )


def manifest(
    scene_id: str, records: list[SceneViewRecord], mesh: BlobRef | None = None
) -> SceneReadyEvent:
    """The scene-ready event: views ordered by angle (then name), images by index, and
    ``mesh``, the merged scene ``.glb``."""
    views = sorted(
        (r.view for r in records),
        key=lambda v: (v.angle is None, v.angle or 0.0, v.view, v.image_index),
    )
    tenant = next((r.tenant for r in records if r.tenant), None)
    return SceneReadyEvent(scene_id=scene_id, views=views, tenant=tenant, mesh=mesh)
