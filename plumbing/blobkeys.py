"""The blob store's key space: which key names which blob, per tenant.

Three kinds of key, each segment escaped (:func:`segment`), told apart by their shape
(segment counts in brackets):

- request output: ``{id}/{index}/{stage}/{name}`` [4], with a tenant
  ``tenants/{t}/{id}/{index}/{stage}/{name}`` [6];
- scene state: ``_scenes/{scene}/{names...}`` [3 or 5+], with a tenant
  ``tenants/{t}/_scenes/{scene}/{names...}`` [5 or 7+];
- tombstone: ``_deleted/{id}`` [2], one per request id (ids are global).

Request and scene ids never start with ``_`` (their pattern has none), so ``_scenes`` and
``_deleted`` cannot be ids; a request whose id is ``tenants`` has 4-segment keys, never
the 5+ of a tenant's keys. :func:`kind_of` reads a key back into its kind and unit (the
request, scene or tombstone it belongs to); ``tests/test_lifecycle_keys.py`` checks that
no two kinds can name the same blob. A tenant's keys share the prefix ``tenants/{t}/``,
so one object-store policy per tenant can confine it (docs/deploy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TENANTS = "tenants"
SCENES = "_scenes"
DELETED = "_deleted"

KeyKind = Literal["request", "scene", "tombstone", "other"]


def segment(value: str) -> str:
    """Encode one key segment so ids like ``..`` or ``a:b`` stay one safe path component."""
    encoded = "".join(
        ch
        if ch.isascii() and (ch.isalnum() or ch in "_-.")
        else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in value
    )
    if encoded.startswith("."):  # never '.', '..' or a hidden file
        encoded = "%2E" + encoded[1:]
    return encoded or "%00"


def tenant_root(tenant: str | None) -> str:
    """``""`` without a tenant, else ``tenants/{tenant}/``: where its keys live."""
    return "" if tenant is None else f"{TENANTS}/{segment(tenant)}/"


def request_prefix(request_id: str, *, tenant: str | None = None) -> str:
    """The folder of every output of one request (no trailing slash)."""
    return tenant_root(tenant) + segment(request_id)


def blob_key(
    request_id: str, image_index: int | None, stage: str, name: str, *, tenant: str | None = None
) -> str:
    """The deterministic key of one output: ``[tenants/{t}/]{id}/{image_index}/{stage}/{name}``."""
    index = "all" if image_index is None else str(int(image_index))
    return "/".join(
        (request_prefix(request_id, tenant=tenant), index, segment(stage), segment(name))
    )


def scene_prefix(scene_id: str, *, tenant: str | None = None) -> str:
    """The folder of one scene's state (no trailing slash)."""
    return f"{tenant_root(tenant)}{SCENES}/{segment(scene_id)}"


def scene_key(scene_id: str, *names: str, tenant: str | None = None) -> str:
    """The key of scene state: ``[tenants/{t}/]_scenes/{scene_id}/{names...}``.

    ``len(names)`` may not be 2: a scene key then has the segment count of no request
    output (see the module docstring).
    """
    if len(names) == 2:
        raise ValueError("a scene key has 3 or 5+ segments, never the 4 of request outputs")
    return "/".join((scene_prefix(scene_id, tenant=tenant), *(segment(n) for n in names)))


def tombstone_key(request_id: str) -> str:
    """``_deleted/{id}``: written first when a request is deleted (docs/design-notes.md)."""
    return f"{DELETED}/{segment(request_id)}"


@dataclass(frozen=True)
class KeyInfo:
    """What a key names: its ``kind``, and ``unit``, the prefix of the request, scene or
    tombstone it belongs to (retention deletes a unit whole or not at all)."""

    kind: KeyKind
    unit: str
    tenant: str | None = None  # the escaped tenant segment, when under ``tenants/``


def kind_of(key: str) -> KeyInfo:
    """Read ``key`` back into its kind and unit (``other``: a key genseg does not write,
    e.g. a client's upload; its unit is the key itself)."""
    parts = key.split("/")
    n = len(parts)
    if n == 4:
        return KeyInfo("request", parts[0])
    if parts[0] == SCENES and n >= 3:
        return KeyInfo("scene", "/".join(parts[:2]))
    if parts[0] == DELETED and n == 2:
        return KeyInfo("tombstone", key)
    if parts[0] == TENANTS and n == 6 and parts[2] != SCENES:
        return KeyInfo("request", "/".join(parts[:3]), parts[1])
    if parts[0] == TENANTS and n >= 5 and n != 6 and parts[2] == SCENES:
        return KeyInfo("scene", "/".join(parts[:4]), parts[1])
    return KeyInfo("other", key)
