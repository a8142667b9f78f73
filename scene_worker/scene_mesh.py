"""The merged scene ``.glb`` of a complete scene: its views read from the blob store,
fused (:mod:`scene_worker.merge`), written under the scene's state keys.

A view takes part when its record has an angle (the camera's azimuth; the rest of the
camera is the deployment's orbit, :data:`scene_worker.camera.DEFAULT_ORBIT`), a depth
PNG in **metres** (a relative depth map has no scale: it cannot place objects in the
world), and objects. A scene with no such view gets no merged mesh.

Objects' masks: the references the view record carries (``SceneViewRecord.masks``,
when the record has that field), else the segmenter's deterministic mask keys
(``{id}/{image_index}/seg/mask-{k}.png``, ``k`` the asset's index, as in
``SceneView.objects``).

The depth PNG is read here rather than with :func:`seg_worker.depth.decode_depth_png`,
whose module loads torch and transformers: the scene stage needs no model library.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from plumbing.blobkeys import blob_key
from plumbing.blobstore import BlobStore
from plumbing.images import decode_image
from scene_worker.camera import DEFAULT_ORBIT, OrbitCamera
from scene_worker.merge import ViewInput, ViewObject, fuse, scene_glb
from schemas import SceneViewRecord

log = logging.getLogger(__name__)

#: Largest image, depth or mask blob read (pixels), as the seg worker's default.
MAX_PIXELS = 4096 * 4096
#: Text chunks of the seg worker's depth PNG (seg_worker.depth.UNITS_KEY, SCALE_KEY).
_UNITS_KEY, _SCALE_KEY = "genseg:depth_units", "genseg:depth_scale"


def read_metric_depth(data: bytes) -> np.ndarray | None:
    """Depth ``[H, W]`` float32 in metres from the seg worker's 16-bit depth PNG; None
    when its units are not metres."""
    image = Image.open(io.BytesIO(data))
    if image.info.get(_UNITS_KEY) != "metres":
        return None
    scale = float(image.info.get(_SCALE_KEY, 1.0))
    return (np.asarray(image, np.float64) / 65535.0 * scale).astype(np.float32)


def _mask(blob: BlobStore, rec: SceneViewRecord, k: int) -> np.ndarray:
    refs = getattr(rec, "masks", None)
    if refs:
        data = blob.get(refs[k])
    else:  # until view records carry their masks' references: the seg worker's keys
        key = blob_key(rec.view.id, rec.view.image_index, "seg", f"mask-{k}.png", tenant=rec.tenant)
        data = blob.get_key(key, max_bytes=MAX_PIXELS)
    return np.asarray(decode_image(data, max_pixels=MAX_PIXELS, mode="L")) >= 128


def view_input(blob: BlobStore, rec: SceneViewRecord) -> ViewInput | None:
    """The view of ``rec`` for the merge; None when it cannot take part (see module)."""
    view = rec.view
    if view.angle is None or view.depth is None or not view.objects:
        return None
    depth = read_metric_depth(blob.get(view.depth))
    if depth is None:
        return None
    image = np.asarray(decode_image(blob.get(view.image), max_pixels=MAX_PIXELS, mode="RGB"))
    objects = [ViewObject(label, _mask(blob, rec, k)) for k, label in enumerate(view.objects)]
    return ViewInput(view.angle, image, depth, objects)


def merged_glb(
    blob: BlobStore, records: Sequence[SceneViewRecord], camera: OrbitCamera = DEFAULT_ORBIT
) -> bytes | None:
    """The merged ``.glb`` of a complete scene's ``records`` (the first image of each
    view), or None when no view can take part."""
    firsts = sorted(
        (r for r in records if r.view.image_index == 0),
        key=lambda r: (r.view.angle is None, r.view.angle or 0.0, r.view.view),
    )
    views = [v for r in firsts if (v := view_input(blob, r)) is not None]
    if not views:
        return None
    merged = fuse(views, camera)
    log.info(
        "scene %s: %d objects merged from %d views",
        records[0].scene_id,
        len(merged),
        len(views),
    )
    return scene_glb(views, merged, camera)


__all__ = ["merged_glb", "read_metric_depth", "view_input"]
