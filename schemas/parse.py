"""Decoding record values into contract events, with one error type for bad input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class InvalidEvent(ValueError):
    """A record value that is not a valid contract event; never worth retrying."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _load_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"value is not UTF-8: {exc}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers beyond the int-string
        # conversion limit (``sys.get_int_max_str_digits``), which json.loads raises.
        raise InvalidEvent(f"value is not JSON: {str(exc)[:200]}") from None


def _request_id(data: Any) -> str | None:
    """The id of a record that failed validation, when it is usable as a key."""
    if isinstance(data, dict):
        value = data.get("id")
        if isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "(value)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _load_object(raw: bytes) -> dict[str, Any]:
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise InvalidEvent(f"value must be a JSON object, got {type(data).__name__}")
    return data


def _validate(data: dict[str, Any], model: type[T]) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidEvent(_summarise(exc), _request_id(data)) from None
    except (RecursionError, ValueError, TypeError) as exc:  # defensive: never crash on input
        raise InvalidEvent(f"invalid event: {exc}", _request_id(data)) from None


def parse_event(raw: bytes, model: type[T]) -> T:
    """Decode ``raw`` as ``model``; raise :class:`InvalidEvent` on any bad input."""
    return _validate(_load_object(raw), model)


def parse_by_schema(
    raw: bytes, models: Mapping[str, type[T]], *, default: str | None = None, where: str = ""
) -> T:
    """Decode ``raw`` as the model its ``schema`` field names (``default`` when absent).

    The JSON is read once; an unknown schema raises :class:`InvalidEvent` naming the
    expected ones (``where`` says which topic, for the message).
    """
    data = _load_object(raw)
    schema = data.get("schema", default)
    model = models.get(schema) if isinstance(schema, str) else None
    if model is None:
        shown = schema[:100] if isinstance(schema, str) else type(schema).__name__
        expected = " or ".join(repr(name) for name in models)
        raise InvalidEvent(
            f"unknown schema {shown!r}{where}; expected {expected}", _request_id(data)
        )
    return _validate(data, model)
