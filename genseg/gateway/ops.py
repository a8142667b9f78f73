"""Liveness, readiness and metrics: what an orchestrator and Prometheus read."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from genseg.gateway.state import GatewayState

#: How long the broker may take to answer a metadata request before /readyz says no.
READY_TIMEOUT_S = 3.0

router = APIRouter(tags=["operations"])


def _gateway(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


@router.get("/healthz", summary="The process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The broker answers and the view has caught up")
async def readyz(request: Request) -> JSONResponse:
    """200 when the broker answers a metadata request and the view has read the topics
    up to where they ended when the gateway started (so it answers for old requests);
    503 with the reason otherwise."""
    gw = _gateway(request)
    feeder = gw.feeder
    body: dict[str, Any] = {"broker": "unknown", "view": "starting"}
    if feeder is not None:
        body["view"] = "caught_up" if feeder.caught_up.is_set() else "catching_up"
        try:
            await asyncio.wait_for(feeder.consumer.topics(), READY_TIMEOUT_S)
            body["broker"] = "ok"
        except Exception as exc:  # any failure to answer is "not ready"
            body["broker"] = f"unreachable: {type(exc).__name__}"
    ready = body["broker"] == "ok" and body["view"] == "caught_up"
    if ready:
        return JSONResponse({"status": "ready", **body})
    return JSONResponse(
        {"error": "not_ready", "message": "the gateway is not ready", **body}, status_code=503
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    gw = _gateway(request)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
