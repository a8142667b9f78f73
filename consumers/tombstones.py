"""The runtime's one deletion check: no stage publishes outputs of a deleted request.

:func:`handle_checked` runs a stage's handler and then, in the same worker thread, looks
for each record's tombstone (:mod:`plumbing.erasure`) before the runtime publishes
anything. A record of a deleted request gets its request's blobs erased (those the
handler just wrote among them: the whole prefix is a superset of what any one result
wrote, and all of it must go) and becomes a ``deleted`` dead letter, or no output at all
(``Stage.on_deleted``); the stage forgets the request (``Stage.forget_request``).

Checking after the handler wrote, and the deleter writing the tombstone before it
deletes, is what makes a racing deletion never resurrect a blob (see
:mod:`plumbing.erasure`). A failure counts too: an image deleted under the segmenter
fails to read, and the record still ends as ``deleted``, not ``blob_not_found``.
"""

from __future__ import annotations

import logging
from typing import Any

from consumers.stage import ItemResult, Stage, StageContext
from plumbing.erasure import erase_request, is_deleted
from plumbing.errors import PermanentError

log = logging.getLogger(__name__)


class RequestDeleted(PermanentError):
    """The record's request was deleted while in flight: its outputs were removed."""

    error_type = "deleted"
    #: The dead letter carries no copy of the record's value: the request is erased.
    keeps_value = False


def handle_checked(stage: Stage[Any], events: list[Any], ctx: StageContext) -> list[ItemResult]:
    """``stage.handle(events, ctx)``, with every result of a deleted request replaced."""
    results = stage.handle(events, ctx)
    if stage.on_deleted is None:
        return results
    checked: dict[str, BaseException | bool] = {}
    out = list(results)
    for i, event in enumerate(events):
        request_id = stage.request_id(event)
        if request_id is None or i >= len(out):
            continue
        if request_id not in checked:
            checked[request_id] = _deleted(stage, event, request_id, ctx)
        verdict = checked[request_id]
        if isinstance(verdict, BaseException):  # the store did not answer: retried
            # The handler's own failure says more (it is usually the same outage, met
            # first, on the write that matters); the failed check says why otherwise.
            if not isinstance(out[i], BaseException):
                out[i] = verdict
        elif verdict:
            out[i] = (
                RequestDeleted(f"request {request_id} was deleted; its outputs were removed")
                if stage.on_deleted == "dead_letter"
                else []
            )
    return out


def _deleted(
    stage: Stage[Any], event: Any, request_id: str, ctx: StageContext
) -> BaseException | bool:
    """Whether ``request_id`` is deleted, erasing it (and forgetting it) when it is."""
    try:
        if not is_deleted(ctx.blob, request_id):
            return False
        tenant = getattr(event, "tenant", None)
        erased = erase_request(ctx.blob, request_id, tenant=tenant)
    except Exception as exc:
        return exc
    stage.forget_request(request_id)
    log.info(
        "stage %s: request %s was deleted in flight; removed %d blobs",
        stage.name,
        request_id,
        len(erased.keys),
    )
    return True
