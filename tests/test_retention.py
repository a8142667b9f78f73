"""Blob retention: GENSEG_BLOB_TTL, ``genseg blobs gc`` and ``genseg blobs lifecycle``.

Against the real directory store and a real S3 server (moto) on loopback. Ages are real:
local blobs are back-dated with ``os.utime``; on S3, where a client cannot set an
object's age, the test waits until the clock has passed the TTL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from plumbing.blobkeys import blob_key, scene_key, tombstone_key
from plumbing.blobstore import BlobStore, LocalBlobStore
from plumbing.retention import collect, lifecycle_rule, parse_duration
from tests.rel_utils import REPO, run_cli
from tests.s3_server import MotoServer

PNG = "image/png"
DAY = 86_400


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENSEG_", "AWS_"))}
    return {**env, "COLUMNS": "240", **extra}


def _age(store: LocalBlobStore, key: str, days: float) -> None:
    """Back-date the blob under ``key`` by ``days``."""
    when = time.time() - days * DAY
    os.utime(store.root / key, (when, when))


def _request(store: BlobStore, request_id: str, *, tenant: str | None = None) -> list[str]:
    keys = [
        blob_key(request_id, 0, "gen", "image.png", tenant=tenant),
        blob_key(request_id, 0, "gen", "heatmap-0.png", tenant=tenant),
        blob_key(request_id, 0, "seg", "mask-0.png", tenant=tenant),
    ]
    for key in keys:
        store.put(key, b"p" * 100, PNG)
    return keys


def test_durations() -> None:
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration(" 12h ") == timedelta(hours=12)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("", "7", "d", "7 days", "-1d", "1.5h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_gc_deletes_a_request_only_when_all_of_its_blobs_expired(blob_dir: Path) -> None:
    store = LocalBlobStore(blob_dir)
    old = _request(store, "old")
    mixed = _request(store, "mixed")  # one blob old, the others written today: in flight
    tenant_old = _request(store, "t-old", tenant="acme")
    tenant_live = _request(store, "t-live", tenant="acme")
    scene_old = [scene_key("room", "views", "0", "0.json"), scene_key("room", "intent.json")]
    scene_live = [scene_key("hall", "views", "0", "0.json", tenant="acme")]
    tomb = tombstone_key("gone")
    for key in [*scene_old, *scene_live, tomb]:
        store.put(key, b"{}", "application/json")
    for key in [*old, mixed[0], *tenant_old, *scene_old, tomb]:
        _age(store, key, 8)
    everything = {i.key for i in store.list_info()}
    dry = collect(store, timedelta(days=7), dry_run=True)
    assert {i.key for i in store.list_info()} == everything, "a dry run deletes nothing"
    report = collect(store, timedelta(days=7))
    assert (dry.units_deleted, dry.blobs_deleted) == (report.units_deleted, report.blobs_deleted)
    left = {i.key for i in store.list_info()}
    assert left == {*mixed, *tenant_live, *scene_live}
    assert report.by_kind == {"request": 2, "scene": 1, "tombstone": 1}
    assert report.blobs_deleted == len(old) + len(tenant_old) + len(scene_old) + 1
    assert report.bytes_deleted == 600 + 2 * 2 + 2
    assert report.units_seen == 7


async def test_gc_command_reports_what_it_freed(blob_dir: Path) -> None:
    store = LocalBlobStore(blob_dir)
    _request(store, "r-1")
    for key in _request(store, "r-2"):
        _age(store, key, 3)
    env = _cli_env(GENSEG_BLOB_URL=str(blob_dir))
    unset = await run_cli(["blobs", "gc"], env)
    assert unset.returncode == 2 and "GENSEG_BLOB_TTL is not set" in unset.stderr
    dry = await run_cli(["blobs", "gc", "--dry-run", "--ttl", "2d"], env)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 1 request: 3 blobs, 300 bytes" in dry.stdout
    assert len(list(store.list_info())) == 6
    done = await run_cli(["blobs", "gc"], {**env, "GENSEG_BLOB_TTL": "2d"})
    assert done.returncode == 0, done.stderr
    assert "deleted 1 request: 3 blobs, 300 bytes" in done.stdout and "kept 1 of 2" in done.stdout
    assert {i.key.split("/")[0] for i in store.list_info()} == {"r-1"}


def test_lifecycle_rule_rounds_up_to_days() -> None:
    rule = lifecycle_rule("/blobs/v1", timedelta(hours=36))["Rules"][0]
    assert rule["Filter"] == {"Prefix": "blobs/v1/"}
    assert rule["Expiration"] == {"Days": 2}, "never earlier than the TTL"
    assert lifecycle_rule("", timedelta(minutes=5))["Rules"][0]["Expiration"] == {"Days": 1}


async def test_lifecycle_command_prints_the_rule_for_s3_only(blob_dir: Path) -> None:
    s3 = await run_cli(
        ["blobs", "lifecycle"], _cli_env(GENSEG_BLOB_URL="s3://bkt/blobs", GENSEG_BLOB_TTL="7d")
    )
    assert s3.returncode == 0, s3.stderr
    assert json.loads(s3.stdout)["Rules"][0]["Expiration"] == {"Days": 7}
    assert "put-bucket-lifecycle-configuration --bucket bkt" in s3.stderr
    assert "not a request at a time" in s3.stderr
    local = await run_cli(
        ["blobs", "lifecycle"], _cli_env(GENSEG_BLOB_URL=str(blob_dir), GENSEG_BLOB_TTL="7d")
    )
    assert local.returncode == 2 and "not an S3 bucket" in local.stderr
    assert "genseg blobs gc" in local.stderr


# --- a collection killed halfway, on S3 --------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def _write_all(store: BlobStore, units: list[str]) -> dict[str, list[str]]:
    """Two blobs of each request in ``units``, written in parallel."""

    def write(request_id: str) -> list[str]:
        keys = [blob_key(request_id, 0, "gen", name) for name in ("image.png", "heatmap-0.png")]
        for key in keys:
            store.put(key, b"p" * 100, PNG)
        return keys

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(zip(units, pool.map(write, units), strict=True))


async def test_a_gc_killed_halfway_leaves_every_live_request_whole(moto: MotoServer) -> None:
    bucket = moto.create_bucket("gc")
    os.environ.update(moto.obstore_env())  # this process's store, for writing and checking
    try:
        store = BlobStore.from_url(f"s3://{bucket}/b")
        # Expired and live requests interleaved in key order, so the kill falls among both.
        started = time.monotonic()
        expired = _write_all(store, [f"r-{n:04d}" for n in range(0, 400, 2)])
        # The live ones take as long to write: the TTL must cover that (S3 ages have 1 s
        # resolution), and the expired ones must be older than it when the gc starts.
        ttl = int(3 * (time.monotonic() - started)) + 3  # room for a machine busy with more
        ready_at = time.time() + ttl + 1.5
        # The condition waited for is the clock itself: the expired requests' age.
        await asyncio.sleep(max(0.0, ready_at - time.time()))
        live = _write_all(store, [f"r-{n:04d}" for n in range(1, 400, 2)])
        env = _cli_env(
            **moto.obstore_env(), GENSEG_BLOB_URL=f"s3://{bucket}/b", GENSEG_BLOB_TTL=f"{ttl}s"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "genseg.cli", "blobs", "gc", env=env, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"gc: "), (line, await proc.stderr.read())  # deleting: kill it
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert proc.returncode == -signal.SIGKILL, "killed mid-run, not finished"
        present = {info.key for info in store.list_info()}
        for request_id, keys in live.items():
            assert set(keys) <= present, f"live request {request_id} lost a blob"
        gone = [r for r, keys in expired.items() if not set(keys) & present]
        partial = [
            r for r, keys in expired.items() if set(keys) & present and not set(keys) <= present
        ]
        assert 0 < len(gone) < len(expired), "the kill fell halfway"
        assert len(partial) <= 1, f"expired requests half-deleted: {partial}"
        # Run again: it finishes the job, and still keeps every live request.
        again = await run_cli(["blobs", "gc"], env, timeout=300)
        assert again.returncode == 0, again.stderr
        assert {i.key for i in store.list_info()} == {k for keys in live.values() for k in keys}
    finally:
        for name in moto.obstore_env():
            os.environ.pop(name, None)


async def test_gc_says_when_the_store_cannot_be_reached() -> None:
    from plumbing.broker import free_port

    env = _cli_env(
        GENSEG_BLOB_URL="s3://nowhere/blobs", GENSEG_BLOB_TTL="1d", AWS_ALLOW_HTTP="true",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
    )  # fmt: skip
    result = await run_cli(["blobs", "gc"], env)
    assert result.returncode == 1
    assert result.stderr.startswith("the blob store failed: could not list s3://nowhere/blobs/")
    assert "run it again" in result.stderr and "Traceback" not in result.stderr
