"""JSON errors everywhere: ``{"error": ..., "message": ..., "details": [...]}``.

FastAPI answers bad query parameters with its own 422 format and unknown routes with
``{"detail": ...}``; both are replaced here, so a client parses one error shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as JSON with ``status``."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = details
        self.headers = headers


def error_response(
    status: int,
    error: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """pydantic's errors without the offending input (it may be large, or a secret)."""
    return [
        {"loc": [str(part) for part in err.get("loc", ())], "message": err.get("msg", ""),
         "type": err.get("type", "")}
        for err in list(errors)[:20]
    ]  # fmt: skip


def summary(details: list[dict[str, Any]]) -> str:
    parts = [f"{'.'.join(d['loc']) or '(body)'}: {d['message']}" for d in details[:5]]
    return "; ".join(parts) or "invalid request"


def from_validation(exc: ValidationError, error: str = "invalid_request") -> ApiError:
    details = validation_details(exc.errors(include_url=False))
    return ApiError(422, error, summary(details), details=details)


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.error, exc.message, exc.details, exc.headers)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        phrase = HTTPStatus(exc.status_code).phrase
        name = phrase.lower().replace(" ", "_").replace("-", "_")
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return error_response(exc.status_code, name, message, headers=exc.headers)

    async def request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = validation_details(exc.errors())
        return error_response(422, "invalid_parameters", summary(details), details)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the gateway failed; see its log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(Exception, unexpected)
