"""A request's events as Server-Sent Events: replayed from the view, then live.

Each event is ``id: SEQ``, ``event: KIND`` (progress, image, masks, asset,
dead_letter) and ``data:`` the record's JSON as on its topic. When every image of
the request is terminal the stream sends ``event: end`` with the final status and
closes, so an ``EventSource`` does not reconnect forever. ``Last-Event-ID`` (sent by a
reconnecting ``EventSource``) resumes after that event; sequence numbers belong to
one gateway's view.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from genseg.gateway.state import TERMINAL_STATES, GatewayState
from genseg.gateway.view import StoredEvent

#: How long a browser waits before reconnecting a dropped stream.
RETRY_MS = 2000


def format_event(event: StoredEvent) -> str:
    # A JSON value with line breaks (pretty-printed by some producer) is split over
    # several data lines; the client joins them with newlines, and JSON stays valid.
    data = "".join(f"data: {line}\n" for line in event.data.splitlines() or [""])
    return f"id: {event.seq}\nevent: {event.kind}\n{data}\n"


def _state(gateway: GatewayState, request_id: str) -> str | None:
    row = gateway.the_view().request(request_id)
    return row.state if row else None


async def event_stream(
    gateway: GatewayState, request_id: str, after: int = 0
) -> AsyncIterator[str]:
    """The SSE text of ``request_id``'s events after sequence number ``after``."""
    gateway.metrics.streams.inc()
    try:
        # Watch before reading the view: nothing applied in between is missed, and
        # what arrives twice is dropped by its sequence number.
        with gateway.hub.watch(request_id) as changes:
            yield f"retry: {RETRY_MS}\n\n"
            # Events and state read together (no await between): a batch applied later
            # comes through the watch.
            replay = gateway.the_view().events_after(request_id, after)
            state = _state(gateway, request_id)
            last = after
            for event in replay:
                yield format_event(event)
                last = event.seq
            while state not in TERMINAL_STATES:
                try:
                    change = await asyncio.wait_for(changes.get(), gateway.config.keepalive_s)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if change.closing:
                    return  # no "end": the client reconnects (to another gateway)
                for event in change.events:
                    if event.seq > last:
                        yield format_event(event)
                        last = event.seq
                state = change.state or state
            yield f"event: end\ndata: {json.dumps({'id': request_id, 'status': state})}\n\n"
    finally:
        gateway.metrics.streams.dec()


def last_event_id(header: str | None) -> int:
    """The sequence number of a ``Last-Event-ID`` header (0 when absent or not ours)."""
    return int(header) if header and header.isdigit() and len(header) < 19 else 0
