"""Commands of the data's lifecycle: ``blobs gc``, ``blobs lifecycle`` and ``delete``.

``blobs gc`` and ``blobs lifecycle`` only talk to the blob store; ``delete`` also
publishes a deletion event, so it needs the broker. None imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from genseg.cli.common import console, err_console, reach_broker, settings, setup_logging
from genseg.cli.errors import Failure

if TYPE_CHECKING:
    from datetime import timedelta

    from plumbing.retention import GcReport, Unit
    from plumbing.settings import Settings
    from schemas import DeletionEvent

_GC_AGAIN = "check GENSEG_BLOB_URL (and AWS_*), then run it again: it finishes the job"
TENANT_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
#: How often a collection says how far it got (seconds), when not on a terminal.
PROGRESS_EVERY_S = 1.0

TtlOption = Annotated[
    str | None, typer.Option("--ttl", help="Keep blobs this long (7d, 12h...): GENSEG_BLOB_TTL.")
]


def _ttl(given: str | None, configured: Settings) -> timedelta:
    from plumbing.retention import parse_duration

    text = given or configured.blob_ttl
    if not text:
        raise Failure(
            "GENSEG_BLOB_TTL is not set: blobs are kept forever",
            "set it (e.g. GENSEG_BLOB_TTL=7d) or pass --ttl 7d",
            exit_code=2,
        )
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise Failure(str(exc), "write a number and one of s, m, h, d, w", exit_code=2) from None


@contextlib.contextmanager
def _store_errors(then: str) -> Iterator[None]:
    """A blob store failure said in two lines (what failed, then ``then``)."""
    from plumbing.blobstore import BlobError

    try:
        yield
    except BlobError as exc:
        raise Failure(f"the blob store failed: {exc}", then) from exc


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def gc(
    dry_run: Annotated[
        bool, typer.Option(help="Say what would be deleted; delete nothing.")
    ] = False,
    ttl: TtlOption = None,
) -> None:
    """Delete blobs older than GENSEG_BLOB_TTL, a whole request (or scene) at a time.

    A request's blobs go only when every one of them is older than the TTL, so a request
    still in flight (it wrote recently) is never touched, and an interrupted run leaves
    each request whole or gone; run it again to finish.
    """
    from plumbing.blobstore import BlobStore
    from plumbing.retention import collect

    setup_logging("WARNING")
    configured = settings()
    keep = _ttl(ttl, configured)
    store = BlobStore.from_settings(configured)
    verb = "would delete" if dry_run else "deleted"
    last = [time.monotonic()]

    def line(report: GcReport) -> str:
        return (
            f"{report.units_seen} requests/scenes checked, {verb} {report.units_deleted} "
            f"({report.blobs_deleted} blobs, {_size(report.bytes_deleted)})"
        )

    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console) as bar:
            task = bar.add_task("listing", total=None)

            def on_unit(report: GcReport, unit: Unit, deleted: bool) -> None:
                bar.update(task, description=line(report))

            with _store_errors(_GC_AGAIN):
                report = collect(store, keep, dry_run=dry_run, on_unit=on_unit)
    else:

        def on_unit(report: GcReport, unit: Unit, deleted: bool) -> None:
            first = deleted and report.units_deleted == 1  # say at once that it deletes
            if first or time.monotonic() - last[0] >= PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                sys.stdout.write(f"gc: {line(report)}\n")
                sys.stdout.flush()

        with _store_errors(_GC_AGAIN):
            report = collect(store, keep, dry_run=dry_run, on_unit=on_unit)
    kinds = ", ".join(
        f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in sorted(report.by_kind.items())
    )
    console.print(
        f"{verb} {kinds or 'nothing'}: {report.blobs_deleted} blobs, {_size(report.bytes_deleted)} "
        f"older than {ttl or configured.blob_ttl} in {store.url}; kept "
        f"{report.units_seen - report.units_deleted} of {report.units_seen}",
        markup=False,
        soft_wrap=True,
    )


def lifecycle(ttl: TtlOption = None) -> None:
    """Print the S3 bucket lifecycle rule that expires blobs after GENSEG_BLOB_TTL."""
    from urllib.parse import urlsplit

    from plumbing.retention import lifecycle_rule

    setup_logging("WARNING")
    configured = settings()
    keep = _ttl(ttl, configured)
    parts = urlsplit(configured.blob_url)
    if parts.scheme != "s3":
        raise Failure(
            f"GENSEG_BLOB_URL={configured.blob_url} is not an S3 bucket: lifecycle rules are S3's",
            "expire a directory store with `genseg blobs gc` (e.g. daily from cron)",
            exit_code=2,
        )
    sys.stdout.write(json.dumps(lifecycle_rule(parts.path, keep), indent=2) + "\n")
    err_console.print(
        f"apply with: aws s3api put-bucket-lifecycle-configuration --bucket {parts.netloc} "
        "--lifecycle-configuration file://RULE.json\n"
        "S3 expires each object on its own age (in whole days), not a request at a time: "
        "a request written across midnight can lose its first blobs a day before the rest. "
        "`genseg blobs gc` deletes whole requests.",
        markup=False,
        soft_wrap=True,
    )


def delete(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    tenant: Annotated[
        str | None, typer.Option(help="Its tenant (default: look in every tenant's folder).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Delete even an id with nothing stored yet (a queued request).")
    ] = False,
) -> None:
    """Delete a request: every blob of it, then a deletion event on {prefix}.deletions.

    Its outputs still in flight are removed as they come (the request ends dead-lettered
    as `deleted`), and every seg worker drops its embeddings.
    """
    from consumers.deletion import ANY_TENANT
    from schemas.events import ID_PATTERN

    setup_logging("WARNING")
    configured = settings()
    if not re.match(ID_PATTERN, request_id) or (tenant and not re.match(TENANT_PATTERN, tenant)):
        raise Failure(
            f"{request_id!r} (tenant {tenant!r}) is not a request id (or tenant) of the contract",
            "ids are 1..128 characters of A-Z a-z 0-9 . _ : - (tenants: 1..64, no ':')",
            exit_code=2,
        )
    with _store_errors("check GENSEG_BLOB_URL (and AWS_*), then delete again: it resumes"):
        event = asyncio.run(
            _delete(configured, request_id, ANY_TENANT if tenant is None else tenant, force)
        )
    if event is None:
        raise Failure(
            f"no request {request_id!r}: no blob and no tombstone of it in {configured.blob_url}",
            "check the id (and --tenant); a request queued with nothing written yet: --force",
        )
    console.print(
        f"deleted {request_id}: {event.blobs_deleted} blobs, {_size(event.bytes_deleted)}; "
        f"published on {configured.topics.deletions}",
        markup=False,
        soft_wrap=True,
    )


async def _delete(
    configured: Settings, request_id: str, tenant: str | None, force: bool
) -> DeletionEvent | None:
    from consumers.deletion import delete_request

    await reach_broker(configured)
    return await delete_request(configured, request_id, tenant=tenant, force=force)
