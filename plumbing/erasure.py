"""Deleting a request's blobs so that nothing of it comes back: tombstone first, then erase.

The deleter writes the tombstone ``_deleted/{id}`` **before** it deletes the request's
blobs; a stage checks the tombstone **after** it wrote a record's blobs and before it
publishes the record's outputs (:mod:`consumers.tombstones`). Whatever the
interleaving, one of the two sees the other: a worker's blob written before the
deleter listed the request is deleted by the deleter; one written after was written
after the tombstone, so the worker's check finds it and erases the request itself.

A request's blobs are its prefix (:func:`plumbing.blobkeys.request_prefix`) plus, for a
scene view, its view records in the scene's state: the scene stage leaves a back
reference (:func:`scene_backref_key`) under the request's prefix naming them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote

from plumbing.blobkeys import SCENES, TENANTS, blob_key, kind_of, request_prefix, tombstone_key
from plumbing.blobstore import BlobInfo, BlobNotFound, BlobStore

log = logging.getLogger(__name__)

JSON = "application/json"
#: The largest back reference or tombstone read back.
_SMALL = 64 * 1024
#: Stands for "look in every tenant's folder" (a caller that does not know the tenant).
ANY_TENANT = "*"


@dataclass
class Erased:
    """What an erase removed: the keys and their total size in bytes."""

    keys: list[str] = field(default_factory=list)
    bytes: int = 0

    def add(self, other: Erased) -> None:
        self.keys += other.keys
        self.bytes += other.bytes


def scene_backref_key(request_id: str, image_index: int, *, tenant: str | None) -> str:
    """Where the scene stage notes, under the request's prefix, the scene state it wrote."""
    return blob_key(request_id, image_index, "scene", "view.json", tenant=tenant)


def write_scene_backref(
    store: BlobStore,
    request_id: str,
    image_index: int,
    state_keys: list[str],
    *,
    tenant: str | None,
) -> None:
    """Record that ``state_keys`` (scene state) hold data of this request's image."""
    body = json.dumps({"scene_state": state_keys}).encode()
    store.put(scene_backref_key(request_id, image_index, tenant=tenant), body, JSON)


def write_tombstone(store: BlobStore, request_id: str, *, tenant: str | None) -> None:
    """Mark ``request_id`` deleted: from now on no stage publishes outputs of it."""
    body = {"id": request_id, "tenant": tenant, "deleted_at": now_iso()}
    store.put(tombstone_key(request_id), json.dumps(body).encode(), JSON)


def is_deleted(store: BlobStore, request_id: str) -> bool:
    """Whether ``request_id`` has a tombstone."""
    return store.exists(tombstone_key(request_id))


def tombstone_tenant(store: BlobStore, request_id: str) -> str | None:
    """The tenant recorded in ``request_id``'s tombstone (None: none, or no tombstone)."""
    try:
        data = json.loads(store.get_key(tombstone_key(request_id), max_bytes=_SMALL))
    except (BlobNotFound, ValueError):
        return None
    tenant = data.get("tenant") if isinstance(data, dict) else None
    return tenant if isinstance(tenant, str) else None


def request_blobs(store: BlobStore, request_id: str, *, tenant: str | None) -> list[BlobInfo]:
    """The blobs of ``request_id`` under ``tenant``'s root (its outputs, its back references)."""
    prefix = request_prefix(request_id, tenant=tenant)
    # Only keys of this request's unit: without a tenant, the id ``tenants`` shares its
    # first segment with every tenant's keys.
    return [i for i in store.list_info(prefix) if kind_of(i.key).unit == prefix]


def tenants_holding(store: BlobStore, request_id: str) -> list[str | None]:
    """Every root (None: no tenant; else a tenant) with blobs of ``request_id``."""
    found: list[str | None] = []
    if request_blobs(store, request_id, tenant=None):
        found.append(None)
    for folder in store.list_folders(TENANTS):
        tenant = unquote(folder)  # folder names are escaped segments
        if request_blobs(store, request_id, tenant=tenant):
            found.append(tenant)
    return found


def erase_request(store: BlobStore, request_id: str, *, tenant: str | None) -> Erased:
    """Delete every blob of ``request_id`` under ``tenant``'s root, and the scene state
    its back references name."""
    blobs = request_blobs(store, request_id, tenant=tenant)
    erased = Erased()
    state = [key for info in blobs if _is_backref(info.key) for key in _backref(store, info.key)]
    for key in state:  # scene state first: the back reference must outlive what it names
        try:
            size = len(store.get_key(key, max_bytes=_SMALL))
        except BlobNotFound:
            continue
        store.delete([key])
        erased.keys.append(key)
        erased.bytes += size
    store.delete(info.key for info in blobs)
    erased.keys += [info.key for info in blobs]
    erased.bytes += sum(info.size for info in blobs)
    if erased.keys:
        log.info(
            "erased %d blobs (%d bytes) of request %s", len(erased.keys), erased.bytes, request_id
        )
    return erased


def _is_backref(key: str) -> bool:
    return key.endswith("/scene/view.json")  # scene_backref_key's stage and name


def _backref(store: BlobStore, key: str) -> list[str]:
    """The scene state keys a back reference names: scene keys of its own root only."""
    try:
        data = json.loads(store.get_key(key, max_bytes=_SMALL))
    except (BlobNotFound, ValueError):
        return []
    keys = data.get("scene_state") if isinstance(data, dict) else None
    tenant = kind_of(key).tenant  # escaped, as in the key
    root = f"{TENANTS}/{tenant}/" if tenant is not None else ""
    return [
        k
        for k in (keys if isinstance(keys, list) else [])
        if isinstance(k, str) and kind_of(k).kind == "scene" and k.startswith(root + SCENES + "/")
    ]


@dataclass
class Deletion:
    """The outcome of :func:`delete_request_blobs`."""

    erased: Erased
    tenant: str | None  # the request's tenant, as far as its blobs or the caller tell
    repeated: bool  # a tombstone existed already (deleted before, or a deletion resumed)


def delete_request_blobs(
    store: BlobStore, request_id: str, *, tenant: str | None = ANY_TENANT, force: bool = False
) -> Deletion | None:
    """Tombstone ``request_id``, then erase its blobs: under ``tenant``'s root, or wherever
    they are for :data:`ANY_TENANT`.

    None, and nothing written, for an id with no blob and no tombstone (unknown), unless
    ``force`` (a request still queued, with nothing written yet, is stopped that way).
    """
    known = is_deleted(store, request_id)
    scope = tenant
    roots = _roots(store, request_id, scope)
    if not roots and not known and not force:
        return None
    if tenant == ANY_TENANT:
        tenant = next((r for r in roots if r is not None), None)
        if tenant is None and known:
            tenant = tombstone_tenant(store, request_id)
    write_tombstone(store, request_id, tenant=tenant)
    # Listed again after the tombstone: a blob written since the first look is found
    # here, or its writer finds the tombstone (see the module docstring).
    erased = Erased()
    for root in dict.fromkeys([*roots, *_roots(store, request_id, scope), tenant]):
        erased.add(erase_request(store, request_id, tenant=root))
    return Deletion(erased, tenant, known)


def _roots(store: BlobStore, request_id: str, tenant: str | None) -> list[str | None]:
    if tenant == ANY_TENANT:
        return tenants_holding(store, request_id)
    return [tenant] if request_blobs(store, request_id, tenant=tenant) else []


def now_iso() -> str:
    """The current time, ISO 8601 UTC with milliseconds (``2025-01-02T03:04:05.678Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
