"""Scene state in the blob store: keys, reads by key and listings (local and a real S3 API)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from plumbing.blobstore import (
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    ForeignBlobRef,
    LocalBlobStore,
    S3BlobStore,
    blob_key,
    scene_key,
)
from tests.s3_server import MotoServer


def test_scene_keys_are_escaped_and_apart_from_request_outputs() -> None:
    assert scene_key("room-1", "views", "45", "0.json") == "_scenes/room-1/views/45/0.json"
    assert scene_key("..", "views", ".x", "0.json") == "_scenes/%2E./views/%2Ex/0.json"
    assert scene_key("a:b", "intent.json") == "_scenes/a%3Ab/intent.json"
    # request outputs have four segments, scene state never: they cannot meet
    assert blob_key("_scenes", 0, "seg", "a").count("/") == 3
    with pytest.raises(ValueError, match="segments"):
        scene_key("s", "seg", "a")


def exercise(store: BlobStore) -> None:
    """The same checks for every back end."""
    assert store.list_keys("_scenes/s1/views/") == []
    with pytest.raises(BlobNotFound):
        store.get_key("_scenes/s1/intent.json", max_bytes=100)
    for view in ("0", "45", "90"):
        store.put(scene_key("s1", "views", view, "0.json"), f"v{view}".encode(), "application/json")
    store.put(scene_key("s10", "views", "0", "0.json"), b"other scene", "application/json")
    store.put("req/0/seg/mask-0.png", b"png", "image/png")
    keys = store.list_keys("_scenes/s1/views")
    assert keys == [
        "_scenes/s1/views/0/0.json",
        "_scenes/s1/views/45/0.json",
        "_scenes/s1/views/90/0.json",
    ], "a folder prefix: s10 is not under s1"
    assert store.get_key(keys[1], max_bytes=100) == b"v45"
    store.put(keys[1], b"rewritten", "application/json")  # a redelivery overwrites
    assert store.get_key(keys[1], max_bytes=100) == b"rewritten"
    assert store.list_keys("_scenes/s1/views/") == keys
    with pytest.raises(BlobTooLarge):
        store.get_key(keys[1], max_bytes=3)
    for bad in ("../etc", "_scenes/../x", "/abs"):
        with pytest.raises(ForeignBlobRef):
            store.list_keys(bad)
        with pytest.raises(ForeignBlobRef):
            store.get_key(bad, max_bytes=10)


def test_local_store_lists_and_reads_by_key(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    exercise(store)
    # a write in progress (hidden temporary file) is not listed
    (store.root / "_scenes/s1/views/0/.tmp-abc").write_bytes(b"partial")
    assert len(store.list_keys("_scenes/s1/views/")) == 3


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def test_s3_store_lists_and_reads_by_key(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto.obstore_env().items():
        monkeypatch.setenv(name, value)
    bucket = moto.create_bucket()
    exercise(S3BlobStore(f"s3://{bucket}/blobs/v1"))
    # keys are relative to the store's prefix: another prefix in the bucket is invisible
    assert S3BlobStore(f"s3://{bucket}/blobs").list_keys("_scenes/s1/views/") == []
    assert len(S3BlobStore(f"s3://{bucket}").list_keys("blobs/v1/_scenes/s1/views/")) == 3
