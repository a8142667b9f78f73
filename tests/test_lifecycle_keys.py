"""The blob key space per tenant: no two kinds of key can name the same blob, and every key
reads back into the request, scene or tombstone it belongs to (plumbing.blobkeys)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plumbing.blobkeys import (
    blob_key,
    kind_of,
    request_prefix,
    scene_key,
    scene_prefix,
    tombstone_key,
)
from schemas.events import ID_PATTERN

# Ids and tenants as the contract allows them (the gateway and the stages only ever see
# those), including the awkward ones: "tenants", "all", "0", dots.
ids = st.from_regex(ID_PATTERN.replace("{1,128}", "{1,12}"), fullmatch=True) | st.sampled_from(
    ["tenants", "all", "0", "..", ".x", "a:b"]
)
tenants = (
    st.none()
    | st.from_regex(r"^[A-Za-z0-9._-]{1,8}$", fullmatch=True)
    | st.sampled_from(["all", "0", "_scenes", "tenants", ".."])
)
indices = st.none() | st.integers(0, 7)
names = st.sampled_from(["image.png", "heatmap-0.png", "mask-0.png", "view.json", "a b"])
scene_names = st.lists(names, min_size=1, max_size=4).filter(lambda n: len(n) != 2)


@st.composite
def keys(draw: st.DrawFn) -> tuple[str, str, str]:
    """(kind, unit, key) of a key genseg writes."""
    kind = draw(st.sampled_from(["request", "scene", "tombstone"]))
    tenant = draw(tenants)
    if kind == "request":
        request_id = draw(ids)
        key = blob_key(request_id, draw(indices), draw(names), draw(names), tenant=tenant)
        return kind, request_prefix(request_id, tenant=tenant), key
    if kind == "scene":
        scene_id = draw(ids)
        key = scene_key(scene_id, *draw(scene_names), tenant=tenant)
        return kind, scene_prefix(scene_id, tenant=tenant), key
    request_id = draw(ids)
    return kind, tombstone_key(request_id), tombstone_key(request_id)


@settings(max_examples=2000, deadline=None)
@given(keys(), keys())
def test_no_two_kinds_of_key_name_the_same_blob(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    for kind, unit, key in (a, b):
        info = kind_of(key)
        assert (info.kind, info.unit) == (kind, unit), key
        assert key.startswith(unit)
    if a[2] == b[2]:
        assert a[:2] == b[:2], f"{a} and {b} name the same blob"


def test_a_tenant_s_keys_live_under_its_prefix() -> None:
    assert blob_key("r1", 0, "gen", "image.png") == "r1/0/gen/image.png", "unchanged without"
    assert blob_key("r1", 0, "gen", "image.png", tenant="acme") == "tenants/acme/r1/0/gen/image.png"
    assert scene_key("s", "views", "0", "0.json", tenant="acme").startswith(
        "tenants/acme/_scenes/s/"
    )
    assert tombstone_key("r1") == "_deleted/r1"
    assert kind_of("tenants/acme/r1/0/gen/image.png").tenant == "acme"
    assert kind_of("uploads/x.png").kind == "other"
    with pytest.raises(ValueError):
        scene_key("s", "a", "b", tenant="acme")
