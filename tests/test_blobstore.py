"""The claim-check blob store: a local directory, and S3 through a real (moto) server."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plumbing.blobstore import (
    BlobError,
    BlobIntegrityError,
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    BlobUnavailable,
    Encryption,
    ForeignBlobRef,
    LocalBlobStore,
    S3BlobStore,
    blob_key,
    sha256_hex,
)
from schemas import BlobRef
from tests.s3_server import MotoServer

PNG = "image/png"


@pytest.fixture
def store(blob_dir: Path) -> LocalBlobStore:
    return LocalBlobStore(blob_dir)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- keys ------------------------------------------------------------------------------------


def test_blob_keys_are_deterministic() -> None:
    assert blob_key("req-1", 0, "gen", "image.png") == "req-1/0/gen/image.png"
    assert blob_key("req-1", 0, "gen", "image.png") == blob_key("req-1", 0, "gen", "image.png")
    assert blob_key("req-1", None, "gen", "image.png") == "req-1/all/gen/image.png"
    keys = {
        blob_key("req-1", 0, "gen", "image.png"),
        blob_key("req-1", 1, "gen", "image.png"),
        blob_key("req-1", 0, "seg", "image.png"),
        blob_key("req-1", 0, "gen", "mask.png"),
        blob_key("req-2", 0, "gen", "image.png"),
    }
    assert len(keys) == 5


@pytest.mark.parametrize("request_id", ["..", ".", "a:b", ".hidden", "...", "a/b", "%2E%2E", "é"])
def test_odd_ids_are_one_safe_path_component(store: LocalBlobStore, request_id: str) -> None:
    key = blob_key(request_id, 0, "gen", "image.png")
    first, *rest = key.split("/")
    assert rest == ["0", "gen", "image.png"]
    assert first not in ("", ".", "..") and not first.startswith(".")
    ref = store.put(key, b"pixels", PNG)
    assert store.get(ref) == b"pixels"
    (path,) = _files(store.root)
    assert path.relative_to(store.root).parts == (first, "0", "gen", "image.png")


segments = st.text(min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(segments, segments)
def test_key_segments_are_injective_and_safe(a: str, b: str) -> None:
    ka, kb = blob_key(a, 0, "gen", "x"), blob_key(b, 0, "gen", "x")
    assert (ka == kb) == (a == b)
    first = ka.split("/")[0]
    assert "/" not in first and "\\" not in first and not first.startswith(".")
    assert first.isascii()


def test_uri_and_key_round_trip(store: LocalBlobStore) -> None:
    for request_id in ["..", "a:b", "50%", "a b"]:
        key = blob_key(request_id, 3, "seg", "mask 0.png")
        assert store.key_of(store.uri_for(key)) == key


# --- local store -----------------------------------------------------------------------------


def test_local_put_get(store: LocalBlobStore, blob_dir: Path) -> None:
    data = os.urandom(1000)
    ref = store.put("req-1/0/gen/image.png", data, PNG)
    assert ref.uri == (blob_dir.resolve() / "req-1/0/gen/image.png").as_uri()
    assert ref.sha256 == sha256_hex(data)
    assert (ref.media_type, ref.bytes) == (PNG, 1000)
    assert store.get(ref) == data
    assert (blob_dir / "req-1/0/gen/image.png").read_bytes() == data
    # A fresh store on the same directory (another process) reads it too.
    assert BlobStore.from_url(str(blob_dir)).get(ref) == data
    assert BlobStore.from_url(blob_dir.resolve().as_uri()).get(ref) == data


def test_local_empty_blob(store: LocalBlobStore) -> None:
    ref = store.put("k/empty", b"", "application/octet-stream")
    assert ref.bytes == 0
    assert store.get(ref) == b""


def test_redelivery_overwrites_the_same_key(store: LocalBlobStore) -> None:
    key = blob_key("req-1", 0, "gen", "image.png")
    first = store.put(key, b"first", PNG)
    second = store.put(key, b"second try", PNG)
    assert first.uri == second.uri
    assert store.get(second) == b"second try"
    with pytest.raises(BlobIntegrityError):
        store.get(first)
    assert len(_files(store.root)) == 1  # no temporary or forked files left


def test_writes_go_through_a_complete_temporary_file_and_rename(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(256 * 1024)
    seen: list[tuple[Path, Path, bytes]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((Path(src), Path(dst), Path(src).read_bytes()))
        assert not Path(dst).exists()  # nothing is visible under the key before the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.put("a/b/c.png", data, PNG)
    ((src, dst, content),) = seen
    assert dst == store.root / "a/b/c.png"
    assert src.parent == dst.parent  # same directory, so the rename is atomic
    assert content == data  # complete before it becomes visible
    assert _files(store.root) == [dst]


def test_a_failed_write_leaves_the_old_blob_and_no_debris(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = store.put("a/b.png", b"old", PNG)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(BlobError):
        store.put("a/b.png", b"new and longer", PNG)
    with pytest.raises(BlobError):
        store.put("a/c.png", b"new", PNG)
    monkeypatch.undo()
    assert store.get(old) == b"old"
    assert _files(store.root) == [store.root / "a/b.png"]


def test_readers_never_see_a_partial_blob(store: LocalBlobStore) -> None:
    key = "req-1/0/gen/image.png"
    versions = [b"a" * 300_000, b"b" * 100_000]
    store.put(key, versions[0], PNG)
    path = store.root / key
    stop = threading.Event()
    bad: list[int] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            content = path.read_bytes()
            reads += 1
            if content not in versions:
                bad.append(len(content))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            store.put(key, versions[i % 2], PNG)
    finally:
        stop.set()
        thread.join()
    assert reads > 0
    assert bad == []


def test_new_blobs_follow_the_umask(store: LocalBlobStore) -> None:
    old = os.umask(0o022)
    try:
        store.put("a/perm.png", b"x", PNG)
    finally:
        os.umask(old)
    assert (store.root / "a/perm.png").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "key", ["../x", "/abs/x", "a//b", "a/./b", "a/../../b", "", "a/", "a\\..\\b", "a?b", "a#b"]
)
def test_put_refuses_unsafe_keys(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(ForeignBlobRef):
        store.put(key, b"x", PNG)
    assert _files(store.root.parent) == []


def _foreign_uris(store: LocalBlobStore, outside: Path) -> list[str]:
    url = store.url
    return [
        f"{url}/../outside.png",
        f"{url}/a/../../outside.png",
        f"{url}/%2E%2E/outside.png",
        f"{url}/%2e%2e/outside.png",
        f"{url}/..%2Foutside.png",
        f"{url}/a%2F..%2F..%2Foutside.png",
        f"{url}/a\\..\\..\\outside.png",
        f"{url}/%00",
        f"{url}//outside.png",
        f"{url}/outside.png?x=1",
        f"{url}/outside.png#frag",
        outside.as_uri(),
        f"{url}x/outside.png",  # a sibling directory whose name starts like the store's
        "file:///etc/passwd",
        f"file://otherhost{outside}",
        f"http://127.0.0.1/{outside.name}",
        f"https://example.com{outside}",
        "s3://bucket/outside.png",
        str(outside),
        "outside.png",
    ]


def test_traversal_and_foreign_references_are_refused(
    store: LocalBlobStore, blob_dir: Path
) -> None:
    outside = blob_dir.parent / "outside.png"
    secret = b"not yours"
    outside.write_bytes(secret)
    (blob_dir.parent / f"{blob_dir.name}x").mkdir()
    (blob_dir.parent / f"{blob_dir.name}x" / "outside.png").write_bytes(secret)
    for uri in _foreign_uris(store, outside):
        ref = BlobRef(uri=uri, sha256=sha256_hex(secret), media_type=PNG, bytes=len(secret))
        with pytest.raises(ForeignBlobRef):
            store.get(ref)


def test_a_symlink_out_of_the_store_is_refused(store: LocalBlobStore, blob_dir: Path) -> None:
    outside = blob_dir.parent / "secret"
    outside.write_bytes(b"secret")
    (blob_dir / "link").symlink_to(outside)
    ref = BlobRef(uri=store.uri_for("link"), sha256=sha256_hex(b"secret"), media_type=PNG, bytes=6)
    with pytest.raises(ForeignBlobRef):
        store.get(ref)


def test_corrupted_blobs_are_detected(store: LocalBlobStore) -> None:
    data = b"0123456789" * 100
    ref = store.put("a/img.png", data, PNG)
    path = store.root / "a/img.png"
    for corrupted in [b"X" + data[1:], data[:-1], data + b"!", b""]:
        path.write_bytes(corrupted)
        with pytest.raises(BlobIntegrityError):
            store.get(ref)
    path.write_bytes(data)
    assert store.get(ref) == data
    with pytest.raises(BlobIntegrityError):
        store.get(ref.model_copy(update={"sha256": "0" * 64}))
    with pytest.raises(BlobIntegrityError):
        store.get(ref.model_copy(update={"bytes": ref.bytes + 1}))


def test_a_lying_reference_does_not_load_a_huge_blob(store: LocalBlobStore) -> None:
    big = store.put("a/big.bin", os.urandom(16 * 1024 * 1024), PNG)
    lie = big.model_copy(update={"bytes": 10, "sha256": sha256_hex(b"0123456789")})
    tracemalloc.start()
    try:
        with pytest.raises(BlobIntegrityError):
            store.get(lie)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_missing_blob(store: LocalBlobStore) -> None:
    store.put("req-1/0/gen/image.png", b"x", PNG)
    for key in [
        "req-1/0/gen/other.png",
        "req-9/0/gen/image.png",
        "req-1/0",
        "req-1/0/gen/image.png/x",
    ]:
        ref = BlobRef(uri=store.uri_for(key), sha256=sha256_hex(b"x"), media_type=PNG, bytes=1)
        with pytest.raises(BlobNotFound):
            store.get(ref)


def test_max_bytes(store: LocalBlobStore) -> None:
    ref = store.put("a/img.png", b"x" * 100, PNG)
    assert store.get(ref, max_bytes=100) == b"x" * 100
    with pytest.raises(BlobTooLarge):
        store.get(ref, max_bytes=99)


def test_from_url() -> None:
    assert isinstance(BlobStore.from_url("s3://bucket/prefix"), S3BlobStore)
    with pytest.raises(ValueError, match="unsupported"):
        BlobStore.from_url("http://example.com/blobs")
    with pytest.raises(ValueError):
        S3BlobStore("s3:///no-bucket")


# --- S3, through a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def _point_at(monkeypatch: pytest.MonkeyPatch, server: MotoServer) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.obstore_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    _point_at(monkeypatch, moto)
    return moto.create_bucket()


@pytest.fixture
def s3(bucket: str) -> S3BlobStore:
    return S3BlobStore(f"s3://{bucket}/blobs/v1")


def test_s3_put_get(s3: S3BlobStore, moto: MotoServer, bucket: str) -> None:
    data = os.urandom(5000)
    key = blob_key("a:b", 0, "gen", "image.png")
    ref = s3.put(key, data, PNG)
    assert ref.uri == f"s3://{bucket}/blobs/v1/{key}"
    assert (ref.sha256, ref.bytes, ref.media_type) == (sha256_hex(data), 5000, PNG)
    assert s3.get(ref) == data
    # The reference names the real object, so any S3 client can follow it.
    head = moto.client().head_object(Bucket=bucket, Key=f"blobs/v1/{key}")
    assert head["ContentType"] == PNG
    assert head["ContentLength"] == 5000
    # Another process with the same settings reads it.
    assert BlobStore.from_url(f"s3://{bucket}/blobs/v1/").get(ref) == data
    assert s3.get(s3.put("k/empty", b"", PNG)) == b""


def test_s3_without_a_prefix(bucket: str) -> None:
    store = S3BlobStore(f"s3://{bucket}")
    ref = store.put("x/y.png", b"data", PNG)
    assert ref.uri == f"s3://{bucket}/x/y.png"
    assert store.get(ref) == b"data"


def test_s3_integrity(s3: S3BlobStore, moto: MotoServer, bucket: str) -> None:
    data = b"0123456789" * 100
    ref = s3.put("a/img.png", data, PNG)
    client = moto.client()
    for corrupted in [b"X" + data[1:], data[:-1], data + b"!" * 3_000_000]:
        client.put_object(Bucket=bucket, Key="blobs/v1/a/img.png", Body=corrupted)
        with pytest.raises(BlobIntegrityError):
            s3.get(ref)
    client.put_object(Bucket=bucket, Key="blobs/v1/a/img.png", Body=data)
    assert s3.get(ref) == data
    with pytest.raises(BlobIntegrityError):
        s3.get(ref.model_copy(update={"sha256": "0" * 64}))


def test_s3_missing_and_too_large(s3: S3BlobStore) -> None:
    ref = s3.put("a/img.png", b"x" * 100, PNG)
    with pytest.raises(BlobNotFound):
        s3.get(ref.model_copy(update={"uri": ref.uri.replace("img.png", "nope.png")}))
    with pytest.raises(BlobTooLarge):
        s3.get(ref, max_bytes=10)


def test_s3_foreign_references_are_refused(s3: S3BlobStore, moto: MotoServer, bucket: str) -> None:
    secret = b"secret"
    other = moto.create_bucket("other")
    client = moto.client()
    client.put_object(Bucket=other, Key="blobs/v1/a/img.png", Body=secret)
    for key in ["other/a/img.png", "blobs/v10/a/img.png", "a/img.png"]:
        client.put_object(Bucket=bucket, Key=key, Body=secret)
    uris = [
        f"s3://{other}/blobs/v1/a/img.png",  # another bucket, same key
        f"s3://{bucket}/other/a/img.png",  # another prefix
        f"s3://{bucket}/blobs/v10/a/img.png",  # a prefix that only starts like ours
        f"s3://{bucket}/a/img.png",  # outside the prefix
        f"s3://{bucket}/blobs/v1/../../other/a/img.png",
        f"s3://{bucket}/blobs/v1//a/img.png",
        f"s3://{bucket}/blobs/v1/a/img.png?versionId=1",
        f"s3://{bucket}@{other}/blobs/v1/a/img.png",
        f"http://127.0.0.1:{moto.port}/{bucket}/blobs/v1/a/img.png",
        "file:///etc/passwd",
    ]
    for uri in uris:
        ref = BlobRef(uri=uri, sha256=sha256_hex(secret), media_type=PNG, bytes=len(secret))
        with pytest.raises(ForeignBlobRef):
            s3.get(ref)


def test_s3_stopped_server_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    with MotoServer() as server:
        _point_at(monkeypatch, server)
        store = S3BlobStore(f"s3://{server.create_bucket()}/p")
        ref = store.put("a/img.png", b"pixels", PNG)
        assert store.get(ref) == b"pixels"
    assert not server.running
    started = time.monotonic()
    with pytest.raises(BlobUnavailable):
        store.get(ref)
    with pytest.raises(BlobUnavailable):
        store.put("a/img2.png", b"pixels", PNG)
    assert time.monotonic() - started < 10  # the store's own retries are short


# --- listing with sizes and ages, deletion, encryption at rest (retention, deletion) ---------


def _listing_and_deletion(store: BlobStore) -> None:
    """What retention and deletion need of any back end: key order, sizes, ages, delete."""
    keys = ["b/0/gen/x.png", "a/0/gen/image.png", "a-b/0/gen/x.png", "tenants/t/a/0/seg/m.png"]
    for n, key in enumerate(keys):
        store.put(key, b"x" * (n + 1), PNG)
    listed = list(store.list_info())
    assert [i.key for i in listed] == sorted(keys), "byte order of the keys, as S3 lists"
    assert {i.key: i.size for i in listed}["a/0/gen/image.png"] == 2
    now = datetime.now(UTC)
    assert all(abs((now - i.last_modified).total_seconds()) < 60 for i in listed)
    assert [i.key for i in store.list_info("a")] == ["a/0/gen/image.png"], "a folder, not a-b"
    assert store.list_folders("tenants") == ["t"]
    assert store.exists("a/0/gen/image.png") and not store.exists("a/0/gen/nope.png")
    store.delete(["a/0/gen/image.png", "a/0/gen/never-written.png"])
    assert not store.exists("a/0/gen/image.png")
    assert [i.key for i in store.list_info()] == sorted(set(keys) - {"a/0/gen/image.png"})
    store.delete([])
    with pytest.raises(ForeignBlobRef):
        store.delete(["../outside"])


def test_local_listing_and_deletion(store: LocalBlobStore) -> None:
    _listing_and_deletion(store)
    assert not (store.root / "a").exists(), "an emptied folder goes too"


def test_s3_listing_and_deletion(s3: S3BlobStore) -> None:
    _listing_and_deletion(s3)


@pytest.mark.parametrize(
    ("sse", "kms_key"), [("AES256", None), ("aws:kms", None), ("aws:kms", "alias/genseg")]
)
def test_s3_encrypts_every_write_at_rest(
    bucket: str, moto: MotoServer, monkeypatch: pytest.MonkeyPatch, sse: str, kms_key: str | None
) -> None:
    from plumbing.settings import Settings

    monkeypatch.setenv("GENSEG_S3_SSE", sse)
    if kms_key:
        monkeypatch.setenv("GENSEG_S3_KMS_KEY_ID", kms_key)
    configured = Settings(blob_url=f"s3://{bucket}/enc")
    # Both ways a process builds its store: from its settings (the stage runtime), and
    # from a bare URL (the environment's GENSEG_S3_SSE still applies).
    for n, store in enumerate(
        [BlobStore.from_settings(configured), BlobStore.from_url(f"s3://{bucket}/enc")]
    ):
        store.put(f"r{n}/0/gen/image.png", b"pixels", PNG)
        head = moto.client().head_object(Bucket=bucket, Key=f"enc/r{n}/0/gen/image.png")
        assert head["ServerSideEncryption"] == sse
        if kms_key:
            assert kms_key in head["SSEKMSKeyId"]


def test_s3_writes_unencrypted_without_the_setting(bucket: str, moto: MotoServer) -> None:
    store = S3BlobStore(f"s3://{bucket}/plain")
    store.put("r/0/gen/image.png", b"pixels", PNG)
    head = moto.client().head_object(Bucket=bucket, Key="plain/r/0/gen/image.png")
    assert "ServerSideEncryption" not in head


def test_encryption_settings_are_checked() -> None:
    from pydantic import ValidationError

    from plumbing.settings import Settings

    with pytest.raises(ValidationError, match="GENSEG_S3_SSE"):
        Settings(GENSEG_S3_SSE="rot13")
    with pytest.raises(ValidationError, match="KMS key needs"):
        Settings(GENSEG_S3_SSE="AES256", GENSEG_S3_KMS_KEY_ID="alias/k")
    with pytest.raises(ValueError, match="aws:kms"):
        Encryption.of(None, "alias/k")
    assert Encryption.of("aws:kms", "k").s3_config() == {
        "server_side_encryption": "aws:kms", "sse_kms_key_id": "k",
    }  # fmt: skip
