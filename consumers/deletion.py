"""Deleting a request: its blobs, then a deletion event so that everyone forgets it.

One function for ``genseg delete`` and the gateway's ``DELETE /v1/requests/{id}``:
:func:`delete_request` tombstones the request and erases its blobs
(:func:`plumbing.erasure.delete_request_blobs`: tombstone first, so nothing written
later survives), then publishes a ``genseg.deletion/v1`` event on ``{prefix}.deletions``
keyed by the request id. Downstream systems and the gateway's view forget the request
on it; every seg worker drops its SAM embeddings (:class:`seg_worker.handler.ForgetDeleted`).
A stage still working on the request dead-letters it as ``deleted`` when it is done
(:mod:`consumers.tombstones`).

Repeating a deletion (or resuming one that crashed after the tombstone) does it again:
whatever is left is erased and the event is published again (consumers dedupe by id).
"""

from __future__ import annotations

import asyncio
import logging

from plumbing.blobstore import BlobStore
from plumbing.erasure import ANY_TENANT, delete_request_blobs, now_iso
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import DeletionEvent

log = logging.getLogger(__name__)

__all__ = ["ANY_TENANT", "delete_request"]


async def delete_request(
    settings: Settings,
    request_id: str,
    *,
    tenant: str | None = ANY_TENANT,
    force: bool = False,
    blob: BlobStore | None = None,
    publisher: Publisher | None = None,
) -> DeletionEvent | None:
    """Delete request ``request_id`` and announce it; the deletion event, or None for an
    unknown id (no blob and no tombstone: nothing is written or published).

    ``tenant``: the request's tenant when the caller knows it (the gateway's view does:
    its blobs are looked for there only), None for a request without one, or
    :data:`ANY_TENANT` to look in every tenant's folder (``genseg delete``). ``force``:
    delete even an id with nothing stored yet (a request still queued; the gateway
    passes it for a request its view knows). ``publisher``: a started one to reuse;
    else one is started and stopped here. Blob work runs in a thread.
    """
    store = blob or BlobStore.from_settings(settings)
    outcome = await asyncio.to_thread(
        delete_request_blobs, store, request_id, tenant=tenant, force=force
    )
    if outcome is None:
        return None
    event = DeletionEvent(
        id=request_id,
        tenant=outcome.tenant,
        blobs_deleted=len(outcome.erased.keys),
        bytes_deleted=outcome.erased.bytes,
        deleted_at=now_iso(),
    )
    topic = settings.topics.deletions
    if publisher is not None:
        await publisher.publish(topic, event)
    else:
        async with Publisher(settings) as own:
            await own.publish(topic, event)
    log.info(
        "deleted request %s: %d blobs, %d bytes",
        request_id,
        event.blobs_deleted,
        event.bytes_deleted,
    )
    return event
