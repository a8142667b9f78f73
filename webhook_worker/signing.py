"""Webhook signatures and delivery ids: what a receiver checks and dedupes on.

- ``X-Genseg-Signature: sha256=<hex>``: HMAC-SHA256 of the raw request body, keyed with
  ``GENSEG_WEBHOOK_SECRET``. A receiver recomputes it over the bytes it received (before
  any JSON parsing) and compares in constant time: :func:`verify`.
- ``X-Genseg-Delivery``: a UUID derived from the outcome it delivers (request id and
  ``image_index``), so every attempt, every redelivery after a crash and every duplicate
  record of one image's terminal outcome carries the same id; a receiver that has seen
  it already can answer 2xx and do nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

SIGNATURE_HEADER = "X-Genseg-Signature"
DELIVERY_HEADER = "X-Genseg-Delivery"
_SCHEME = "sha256="
#: Fixed namespace of the delivery ids (uuid5): the same outcome, the same id, forever.
_DELIVERY_NAMESPACE = uuid.UUID("6f1f7c52-3f0e-5a8e-9b1e-6e0c9c3a2d41")


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Genseg-Signature`` value of ``body``: ``sha256=`` and 64 hex digits."""
    return _SCHEME + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify(secret: str | bytes, body: bytes, signature: str | None) -> bool:
    """Whether ``signature`` (the header's value) signs ``body`` with ``secret``.

    Constant-time in the signature's content; False for a missing or malformed header.
    """
    if not signature:
        return False
    given = signature.strip().encode("utf-8", "replace")
    return hmac.compare_digest(sign(secret, body).encode("ascii"), given)


def delivery_id(request_id: str, image_index: int | None) -> str:
    """The ``X-Genseg-Delivery`` of the terminal outcome of (``request_id``,
    ``image_index``); ``image_index`` None: an outcome that covers every image."""
    index = "*" if image_index is None else str(image_index)
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{request_id}\x00{index}"))
