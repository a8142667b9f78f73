"""Blob retention: ``GENSEG_BLOB_TTL`` and the garbage collection behind ``genseg blobs gc``.

The unit of retention is the request (and the scene, and the tombstone): a unit's blobs
are deleted only when every one of them is older than the TTL, one unit at a time. A
request still being worked on has written a blob recently, so it is never touched, and a
collection killed halfway leaves each unit whole or (the one it was deleting) already
expired. S3's own lifecycle rules (:func:`lifecycle_rule`) expire objects one by one
instead; see docs/deploy.md for when to use which.

The store lists keys in byte order, so the keys of one unit come together: a unit is
judged as soon as the listing has passed its prefix, and memory stays bounded by the
largest unit, not the store.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from plumbing.blobkeys import kind_of
from plumbing.blobstore import BlobInfo, BlobStore

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` as a timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 7d, 12h, 30m or 45s")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


@dataclass
class Unit:
    """The blobs of one request, scene or tombstone (``prefix`` names it)."""

    prefix: str
    kind: str
    blobs: list[BlobInfo] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b.size for b in self.blobs)

    @property
    def newest(self) -> datetime:
        return max(b.last_modified for b in self.blobs)


@dataclass
class GcReport:
    """What a collection found and freed (``deleted_*``: would free, on a dry run)."""

    dry_run: bool
    ttl: timedelta
    cutoff: datetime
    units_seen: int = 0
    blobs_seen: int = 0
    bytes_seen: int = 0
    units_deleted: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)  # units deleted per kind


def units(infos: Iterator[BlobInfo]) -> Iterator[Unit]:
    """Group a key-ordered listing into units, each yielded once the listing passed it."""
    open_units: dict[str, Unit] = {}
    previous = b""
    ordered = True
    for info in infos:
        encoded = info.key.encode("utf-8")
        if encoded < previous and ordered:
            ordered = False  # a store that does not list in order: judge units at the end
            log.warning("the blob store does not list in key order; gc holds every unit")
        previous = encoded
        if ordered:
            for prefix in [p for p in open_units if _passed(p, info.key)]:
                yield open_units.pop(prefix)
        kind = kind_of(info.key)
        unit = open_units.setdefault(kind.unit, Unit(kind.unit, kind.kind))
        unit.blobs.append(info)
    yield from open_units.values()


def _passed(prefix: str, key: str) -> bool:
    """Whether a listing at ``key`` is past every key of the unit ``prefix``."""
    folder = prefix + "/"
    if key == prefix or key.startswith(folder):
        return False
    return key.encode("utf-8") > folder.encode("utf-8")


def collect(
    store: BlobStore,
    ttl: timedelta,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    on_unit: Callable[[GcReport, Unit, bool], Any] | None = None,
) -> GcReport:
    """Delete every unit whose newest blob is older than ``ttl`` (see the module doc).

    ``on_unit(report, unit, deleted)`` is called after each unit (progress); ``now`` is
    the clock (UTC) the ages are measured against.
    """
    cutoff = (now or datetime.now(UTC)) - ttl
    report = GcReport(dry_run=dry_run, ttl=ttl, cutoff=cutoff)
    for unit in units(store.list_info()):
        report.units_seen += 1
        report.blobs_seen += len(unit.blobs)
        report.bytes_seen += unit.bytes
        expired = unit.newest < cutoff
        if expired:
            if not dry_run:
                store.delete(b.key for b in unit.blobs)
            report.units_deleted += 1
            report.blobs_deleted += len(unit.blobs)
            report.bytes_deleted += unit.bytes
            report.by_kind[unit.kind] = report.by_kind.get(unit.kind, 0) + 1
            log.debug(
                "gc %s %s (%d blobs)",
                "would delete" if dry_run else "deleted",
                unit.prefix,
                len(unit.blobs),
            )
        if on_unit is not None:
            on_unit(report, unit, expired)
    return report


def lifecycle_rule(store_prefix: str, ttl: timedelta) -> dict[str, Any]:
    """The S3 bucket lifecycle configuration that expires blobs under ``store_prefix``
    after ``ttl`` (whole days, at least one: S3 counts expiry in days), for
    ``aws s3api put-bucket-lifecycle-configuration --lifecycle-configuration``.

    S3 expires each object on its own age, not per request: a request whose blobs were
    written across a day boundary can lose its older blobs a day before its newer ones.
    """
    days = max(1, -(-int(ttl.total_seconds()) // 86_400))  # round up: never expire early
    prefix = f"{store_prefix.strip('/')}/" if store_prefix.strip("/") else ""
    return {
        "Rules": [
            {
                "ID": "genseg-blob-ttl",
                "Filter": {"Prefix": prefix},
                "Status": "Enabled",
                "Expiration": {"Days": days},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
            }
        ]
    }
