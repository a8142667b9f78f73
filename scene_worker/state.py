"""Scene bookkeeping in the blob store, under ``_scenes/{scene_id}/`` (see docs/scenes.md),
or ``tenants/{tenant}/_scenes/{scene_id}/`` for a tenant's scene.

Keys are deterministic, so a redelivered view record overwrites its own state. Each view
record also gets a back reference under its request's prefix, so that deleting the
request finds and deletes it (:mod:`plumbing.erasure`).
"""

from __future__ import annotations

import json
import logging

from plumbing.blobstore import BlobNotFound, BlobStore, scene_key
from plumbing.erasure import write_scene_backref
from schemas import BlobRef, SceneViewRecord, parse_event

log = logging.getLogger(__name__)

JSON = "application/json"
GLB = "model/gltf-binary"
#: Largest scene state blob read back (a view record is about 1 KiB).
_STATE_LIMIT = 1 << 20


class SceneState:
    """Scene bookkeeping in the blob store, under ``[tenants/{tenant}/]_scenes/{scene_id}/``."""

    def __init__(self, blob: BlobStore, tenant: str | None = None) -> None:
        self.blob = blob
        self.tenant = tenant

    def record_view(self, rec: SceneViewRecord) -> None:
        """Write ``views/{view}/{image_index}.json`` (deterministic: a redelivery overwrites),
        after its back reference under the view's request."""
        key = self._key(rec.scene_id, "views", rec.view.view, f"{rec.view.image_index}.json")
        write_scene_backref(self.blob, rec.view.id, rec.view.image_index, [key], tenant=self.tenant)
        self.blob.put(key, rec.to_json_bytes(), JSON)

    def views(self, scene_id: str) -> list[SceneViewRecord]:
        """Every recorded view image of ``scene_id`` (unreadable records are skipped)."""
        records = []
        for key in self.blob.list_keys(self._key(scene_id, "views")):
            try:
                records.append(parse_event(self._read(key) or b"", SceneViewRecord))
            except ValueError as exc:  # InvalidEvent: a damaged record must not block the scene
                log.warning("scene %s: skipping unreadable view record %s: %s", scene_id, key, exc)
        return records

    def intent(self, scene_id: str) -> dict[int, int] | None:
        """The scenes topic's end offsets (partition -> offset) before the first publish."""
        data = self._read(self._key(scene_id, "intent.json"))
        if data is None:
            return None
        return {int(p): int(o) for p, o in json.loads(data)["end_offsets"].items()}

    def write_intent(self, scene_id: str, end_offsets: dict[int, int]) -> None:
        body = {"end_offsets": {str(p): o for p, o in sorted(end_offsets.items())}}
        self.blob.put(self._key(scene_id, "intent.json"), json.dumps(body).encode(), JSON)

    def published(self, scene_id: str) -> bool:
        return self._read(self._key(scene_id, "published.json")) is not None

    def mark_published(self, scene_id: str, partition: int, offset: int) -> None:
        body = {"partition": partition, "offset": offset}
        self.blob.put(self._key(scene_id, "published.json"), json.dumps(body).encode(), JSON)

    def write_mesh(self, scene_id: str, data: bytes) -> BlobRef:
        """Write the merged scene ``.glb`` (``scene.glb``) and return its reference."""
        return self.blob.put(self._key(scene_id, "scene.glb"), data, GLB)

    def _key(self, scene_id: str, *names: str) -> str:
        return scene_key(scene_id, *names, tenant=self.tenant)

    def _read(self, key: str) -> bytes | None:
        try:
            return self.blob.get_key(key, max_bytes=_STATE_LIMIT)
        except BlobNotFound:
            return None
