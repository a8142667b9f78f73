"""The gateway's materialized view of the topics, in one SQLite file.

The topics are the source of truth; this file is a cache of what they say about each
request, plus the offsets it was built up to. Records are applied in one transaction
with their offsets, so a restart resumes where it stopped and a lost file is rebuilt
by reading the topics from the beginning. Applying a record twice changes nothing
(events are unique by topic, partition and offset; the first terminal outcome of an
image wins), so two gateways may even share one file.

Only the event loop's thread uses a :class:`View` (SQLite connections are per thread).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import (
    AssetReadyEvent,
    BlobRef,
    DeadLetterEvent,
    DeletionEvent,
    Event,
    ImageReadyEvent,
    InpaintEvent,
    MasksReadyEvent,
    ProgressEvent,
    PromptEvent,
    WebhookDelivery,
)

log = logging.getLogger(__name__)

#: Bump when the tables change: an older file is then rebuilt from the topics.
SCHEMA_VERSION = "2"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, tenant TEXT, request TEXT, num_images INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'queued', step INTEGER, steps INTEGER, failure TEXT,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS requests_recent ON requests (created_ms);
CREATE TABLE IF NOT EXISTS images (
    id TEXT NOT NULL, image_index INTEGER NOT NULL, image TEXT, masks TEXT,
    outcome TEXT, terminal TEXT, PRIMARY KEY (id, image_index));
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT NOT NULL, delivery TEXT NOT NULL, image_index INTEGER, data TEXT NOT NULL,
    PRIMARY KEY (id, delivery));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, kind TEXT NOT NULL,
    data TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    UNIQUE (topic, partition, "offset"));
CREATE INDEX IF NOT EXISTS events_by_request ON events (id, seq);
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT PRIMARY KEY, id TEXT NOT NULL, ref TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deleted (id TEXT PRIMARY KEY);
"""
_DATA_TABLES = ("offsets", "requests", "images", "webhooks", "events", "blobs", "deleted")
#: The tables that hold what the view knows of one request (column ``id``).
_REQUEST_TABLES = ("requests", "images", "webhooks", "events", "blobs")

#: Request states, in the order a request goes through them.
STATES = ("queued", "generating", "segmenting", "done", "failed")


@dataclass(frozen=True)
class Record:
    """One decoded record, as the feeder hands it over (topic by its short name)."""

    topic: str
    partition: int
    offset: int
    event: Event
    raw: str
    #: The record's timestamp (ms): what the times of a request's status are, so every
    #: gateway (and a rebuilt view) tells the same times.
    timestamp_ms: int


@dataclass(frozen=True)
class StoredEvent:
    """An event of a request's stream (``GET /v1/requests/{id}/events``)."""

    seq: int
    kind: str  # progress | image | masks | asset | dead_letter
    data: str


@dataclass(frozen=True)
class RequestRow:
    id: str
    tenant: str | None
    request: dict[str, Any] | None
    num_images: int
    state: str
    step: int | None
    steps: int | None
    failure: dict[str, Any] | None
    created_ms: int
    updated_ms: int


@dataclass(frozen=True)
class ImageRow:
    image_index: int
    image: dict[str, Any] | None
    masks: dict[str, Any] | None
    outcome: str | None  # asset | dead_letter
    terminal: dict[str, Any] | None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


class View:
    """The requests, their images, events, webhook deliveries and blobs, with offsets."""

    def __init__(self, path: str | Path, *, identity: str = "") -> None:
        """Open (or create) the view at ``path``. ``identity`` names the topics it mirrors
        (brokers and prefix): a file built from other topics is emptied and rebuilt."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL with NORMAL: a commit is not fsynced, yet the file stays consistent; a
        # power cut loses at most the last commits, which the topics still hold.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_TABLES)
        self._check_meta(identity)

    def close(self) -> None:
        self.db.close()

    def _check_meta(self, identity: str) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        wanted = {"schema_version": SCHEMA_VERSION, "identity": identity}
        if meta and meta != wanted:
            log.warning("view %s was built for %s; rebuilding it from the topics", self.path, meta)
            self.reset()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", wanted.items()
            )

    def reset(self) -> None:
        """Forget everything: the next read starts from the beginning of the topics."""
        with self.db:
            for table in _DATA_TABLES:
                self.db.execute(f"DELETE FROM {table}")  # fixed names, no input

    # --- writes ----------------------------------------------------------------------

    def accept(self, event: PromptEvent | InpaintEvent, tenant: str | None) -> bool:
        """Record a request submitted here, before it is published (read-your-writes).
        False when its id is already known (nothing is changed then)."""
        now = _now_ms()
        with self.db:
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO requests (id, tenant, request, num_images, created_ms,"
                " updated_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (event.id, tenant, event.model_dump_json(exclude_none=True),
                 event.num_images, now, now),
            )  # fmt: skip
        return cursor.rowcount == 1

    def forget(self, request_id: str) -> None:
        """Undo :meth:`accept` of a request whose publishing failed, unless the topics
        meanwhile said something about it."""
        with self.db:
            self.db.execute(
                "DELETE FROM requests WHERE id = ? AND state = 'queued' AND step IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM events WHERE events.id = requests.id)",
                (request_id,),
            )

    def erase(self, request_id: str) -> None:
        """Forget ``request_id`` for good: what the view knew of it, and any record of it
        read later (its deletion event, or a gateway's own DELETE)."""
        with self.db:
            self._erase(request_id)

    def _erase(self, request_id: str) -> None:
        for table in _REQUEST_TABLES:
            self.db.execute(f"DELETE FROM {table} WHERE id = ?", (request_id,))
        self.db.execute("INSERT OR IGNORE INTO deleted (id) VALUES (?)", (request_id,))

    def is_deleted(self, request_id: str) -> bool:
        found = self.db.execute("SELECT 1 FROM deleted WHERE id = ?", (request_id,)).fetchone()
        return found is not None

    def apply(
        self, records: list[Record], ends: dict[tuple[str, int], int], blob_key: Any
    ) -> tuple[dict[str, list[StoredEvent]], set[str]]:
        """Apply ``records`` and store ``ends`` (full topic, partition) -> next offset, in
        one transaction. ``blob_key(uri)`` is the store's key of a reference, or None.

        Returns the new stream events per request and the requests whose state changed.
        """
        new_events: dict[str, list[StoredEvent]] = {}
        touched: dict[str, int] = {}  # request id -> its newest record's timestamp
        with self.db:
            for record in records:
                request_id = self._apply_one(record, blob_key, new_events)
                if request_id is not None:
                    touched[request_id] = max(touched.get(request_id, 0), record.timestamp_ms)
            self.db.executemany(
                "INSERT INTO offsets (topic, partition, next) VALUES (?, ?, ?) ON CONFLICT"
                " DO UPDATE SET next = MAX(next, excluded.next)",
                [(topic, partition, offset) for (topic, partition), offset in ends.items()],
            )
            changed = {rid for rid, ts in touched.items() if self._refresh_state(rid, ts)}
        return new_events, changed

    def _ensure(self, request_id: str, tenant: str | None, now: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO requests (id, tenant, created_ms, updated_ms)"
            " VALUES (?, ?, ?, ?)",
            (request_id, tenant, now, now),
        )

    def _apply_one(
        self, record: Record, blob_key: Any, new_events: dict[str, list[StoredEvent]]
    ) -> str | None:
        event = record.event
        request_id = getattr(event, "id", None)
        if not isinstance(request_id, str):
            return None  # a dead letter of a record without a usable id: nobody's request
        if isinstance(event, DeletionEvent):
            self._erase(request_id)
            return None
        if self.is_deleted(request_id):
            return None  # a late record of a deleted request must not bring it back
        self._ensure(request_id, getattr(event, "tenant", None), record.timestamp_ms)
        kind: str | None = None
        if isinstance(event, PromptEvent | InpaintEvent):
            self.db.execute(
                "UPDATE requests SET request = COALESCE(request, ?), num_images = ?,"
                " tenant = COALESCE(tenant, ?), created_ms = ?,"
                " updated_ms = CASE state WHEN 'queued' THEN ? ELSE updated_ms END WHERE id = ?",
                (record.raw, event.num_images, event.tenant, record.timestamp_ms,
                 record.timestamp_ms, request_id),
            )  # fmt: skip
            if isinstance(event, InpaintEvent):
                self._blobs(request_id, [event.image, event.mask], blob_key)
        elif isinstance(event, ProgressEvent):
            self.db.execute(
                "UPDATE requests SET step = MAX(COALESCE(step, 0), ?), steps = ? WHERE id = ?",
                (event.step, event.steps, request_id),
            )
            kind = "progress"
        elif isinstance(event, ImageReadyEvent):
            if self._set_image(request_id, event.image_index, "image", record.raw):
                kind = "image"
            self._blobs(request_id, [event.image, *event.heatmaps.values()], blob_key)
        elif isinstance(event, MasksReadyEvent):
            if self._set_image(request_id, event.image_index, "masks", record.raw):
                kind = "masks"
            self._blobs(request_id, [event.image, *(o.mask for o in event.objects)], blob_key)
        elif isinstance(event, AssetReadyEvent) and record.topic == "assets":
            if self._set_terminal(request_id, event.image_index, "asset", record.raw):
                kind = "asset"
            refs = [event.image, *event.masks, *(a.asset for a in event.assets)]
            self._blobs(request_id, [*refs, event.depth, event.mesh], blob_key)
        elif isinstance(event, DeadLetterEvent) and record.topic == "dlq":
            if self._set_terminal(request_id, event.image_index, "dead_letter", record.raw):
                kind = "dead_letter"
        elif isinstance(event, WebhookDelivery | DeadLetterEvent):  # the webhooks topic
            self._webhook(request_id, event, record.raw)
        if kind is not None:
            cursor = self.db.execute(
                'INSERT OR IGNORE INTO events (id, kind, data, topic, partition, "offset")'
                " VALUES (?, ?, ?, ?, ?, ?)",
                (request_id, kind, record.raw, record.topic, record.partition, record.offset),
            )
            if cursor.rowcount == 1:
                stored = StoredEvent(int(cursor.lastrowid or 0), kind, record.raw)
                new_events.setdefault(request_id, []).append(stored)
        return request_id

    def _set_image(self, request_id: str, index: int, column: str, raw: str) -> bool:
        """Store the first ``image`` or ``masks`` event of an image; False for a repeat."""
        self.db.execute(
            "INSERT OR IGNORE INTO images (id, image_index) VALUES (?, ?)", (request_id, index)
        )
        cursor = self.db.execute(
            f"UPDATE images SET {column} = ? WHERE id = ? AND image_index = ? AND {column} IS NULL",
            (raw, request_id, index),
        )
        return cursor.rowcount == 1

    def _set_terminal(self, request_id: str, index: int | None, outcome: str, raw: str) -> bool:
        """Store an image's first terminal outcome (index None: every image's)."""
        if index is None:
            cursor = self.db.execute(
                "UPDATE requests SET failure = ? WHERE id = ? AND failure IS NULL",
                (raw, request_id),
            )
            return cursor.rowcount == 1
        self.db.execute(
            "INSERT OR IGNORE INTO images (id, image_index) VALUES (?, ?)", (request_id, index)
        )
        cursor = self.db.execute(
            "UPDATE images SET outcome = ?, terminal = ? WHERE id = ? AND image_index = ?"
            " AND terminal IS NULL",
            (outcome, raw, request_id, index),
        )
        return cursor.rowcount == 1

    def _webhook(self, request_id: str, event: Event, raw: str) -> None:
        if isinstance(event, WebhookDelivery):
            delivery, index = event.delivery, event.image_index
        else:
            assert isinstance(event, DeadLetterEvent)
            # A given-up delivery: it replaces the delivery's earlier state, if any.
            delivery, index = f"gave-up:{event.image_index}", event.image_index
        self.db.execute(
            "INSERT INTO webhooks (id, delivery, image_index, data) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET data = excluded.data",
            (request_id, delivery, index, raw),
        )

    def _blobs(self, request_id: str, refs: list[BlobRef | None], blob_key: Any) -> None:
        rows = []
        for ref in refs:
            key = blob_key(ref.uri) if ref is not None else None
            if ref is not None and key is not None:
                rows.append((key, request_id, ref.model_dump_json()))
        # The first request to reference a key owns it: a later event of another request
        # naming the same blob cannot hand it to that request's tenant.
        self.db.executemany("INSERT OR IGNORE INTO blobs (key, id, ref) VALUES (?, ?, ?)", rows)

    def _refresh_state(self, request_id: str, timestamp_ms: int) -> bool:
        """Recompute a request's state from its rows; True when it changed (then its
        ``updated_ms`` is ``timestamp_ms``, the newest record's that changed it)."""
        row = self.request(request_id)
        if row is None:
            return False
        state = derive_state(row, self.images(request_id))
        if state == row.state:
            return False
        self.db.execute(
            "UPDATE requests SET state = ?, updated_ms = MAX(created_ms, ?) WHERE id = ?",
            (state, timestamp_ms, request_id),
        )
        return True

    # --- reads -----------------------------------------------------------------------

    def offsets(self) -> dict[tuple[str, int], int]:
        rows = self.db.execute("SELECT topic, partition, next FROM offsets").fetchall()
        return {(topic, partition): offset for topic, partition, offset in rows}

    def request(self, request_id: str) -> RequestRow | None:
        row = self.db.execute(
            "SELECT id, tenant, request, num_images, state, step, steps, failure, created_ms,"
            " updated_ms FROM requests WHERE id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        return RequestRow(
            row[0], row[1], _loads(row[2]), row[3], row[4], row[5], row[6], _loads(row[7]),
            row[8], row[9],
        )  # fmt: skip

    def images(self, request_id: str) -> list[ImageRow]:
        rows = self.db.execute(
            "SELECT image_index, image, masks, outcome, terminal FROM images WHERE id = ?"
            " ORDER BY image_index",
            (request_id,),
        ).fetchall()
        return [ImageRow(r[0], _loads(r[1]), _loads(r[2]), r[3], _loads(r[4])) for r in rows]

    def webhooks(self, request_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT data FROM webhooks WHERE id = ? ORDER BY delivery", (request_id,)
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def events_after(self, request_id: str, seq: int) -> list[StoredEvent]:
        rows = self.db.execute(
            "SELECT seq, kind, data FROM events WHERE id = ? AND seq > ? ORDER BY seq",
            (request_id, seq),
        ).fetchall()
        return [StoredEvent(*r) for r in rows]

    def blob(self, key: str) -> tuple[BlobRef, str] | None:
        """The reference and request id of a blob that an event named, or None."""
        row = self.db.execute("SELECT ref, id FROM blobs WHERE key = ?", (key,)).fetchone()
        return (BlobRef.model_validate_json(row[0]), row[1]) if row else None

    def recent(self, tenant: str | None, limit: int, *, any_tenant: bool) -> list[str]:
        """Ids of the newest requests (of ``tenant`` unless ``any_tenant``)."""
        if any_tenant:
            rows = self.db.execute(
                "SELECT id FROM requests ORDER BY created_ms DESC, id LIMIT ?", (limit,)
            )
        else:
            rows = self.db.execute(
                "SELECT id FROM requests WHERE tenant = ? ORDER BY created_ms DESC, id LIMIT ?",
                (tenant, limit),
            )
        return [r[0] for r in rows.fetchall()]

    def state_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        rows = self.db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall()
        counts.update({state: n for state, n in rows})
        return counts


def derive_state(row: RequestRow, images: list[ImageRow]) -> str:
    """``queued`` -> ``generating`` -> ``segmenting`` -> ``done`` | ``failed``.

    Done when every image has its terminal outcome; failed when one of them (or the
    request as a whole) is a dead letter.
    """
    by_index = {image.image_index: image for image in images}
    count = max([row.num_images, *(i + 1 for i in by_index)])
    outcomes = [by_index[i].outcome if i in by_index else None for i in range(count)]
    if row.failure is not None or (None not in outcomes):
        failed = row.failure is not None or "dead_letter" in outcomes
        return "failed" if failed else "done"
    if any(image.image is not None for image in images):
        return "segmenting"
    return "generating" if row.step is not None else "queued"
