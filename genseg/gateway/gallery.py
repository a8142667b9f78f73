"""The gallery: one HTML page, a style sheet and a script, served as they are on disk
(``static/``). The page carries the gateway's defaults as JSON; nothing is built."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from genseg.gateway.errors import ApiError
from genseg.gateway.state import GatewayState
from genseg.profiles import profile_defaults

STATIC = Path(__file__).parent / "static"
#: The image sides offered; the profile's own is among them (the toy draws 64x64 only).
SIZES = (64, 128, 256, 512)
_ASSETS = {"gallery.css": "text/css", "gallery.js": "text/javascript"}

router = APIRouter(include_in_schema=False)


@cache
def _page_template() -> str:
    return (STATIC / "gallery.html").read_text(encoding="utf-8")


def page_config(gw: GatewayState) -> dict[str, object]:
    defaults = profile_defaults(gw.settings.models)
    return {
        "models": gw.settings.models,
        "size": gw.default_size,
        "sizes": sorted({*SIZES, gw.default_size}),
        "steps": defaults.demo_steps,
        "min_confidence": defaults.demo_min_confidence,
        "auth": gw.keys is not None,
    }


@router.get("/", response_class=HTMLResponse)
async def gallery(request: Request) -> HTMLResponse:
    gw: GatewayState = request.app.state.gateway
    # "</" cannot end the script element early: JSON allows "<\/" for "</".
    config = json.dumps(page_config(gw)).replace("</", "<\\/")
    return HTMLResponse(_page_template().replace("__CONFIG__", config))


@router.get("/gallery/{name}")
async def asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        raise ApiError(404, "not_found", f"no gallery file {name!r}")
    return FileResponse(STATIC / name, media_type=_ASSETS[name])
