"""API keys: ``GENSEG_API_KEYS`` names a TOML file mapping each key to its tenant.

::

    [keys]
    "k-3f9a1c0d8e7b6a5f" = "acme"
    "k-77e0b2c4d6f8a1b3" = "globex"

With the file, every ``/v1`` call needs ``Authorization: Bearer KEY`` and acts as that
key's tenant. The file is read again when it changes (checked at most once a second),
so keys are added and revoked without a restart. Keys are held as their SHA-256 only
and looked up by it: the lookup's timing says nothing about a key's characters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # the contract's tenant pattern
_MIN_KEY_CHARS = 16


class ApiKeysError(ValueError):
    """The API keys file cannot be used; the message says why."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``tenant`` None on an open gateway (no keys file)."""

    tenant: str | None
    authenticated: bool

    def may_see(self, owner: str | None) -> bool:
        """Whether this caller may see a request (or blob) of tenant ``owner``."""
        return not self.authenticated or owner == self.tenant


OPEN = Caller(tenant=None, authenticated=False)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, where: str = "API keys file") -> dict[str, str]:
    """SHA-256 of each key -> tenant, from the TOML text of a keys file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ApiKeysError(f"{where}: not TOML: {exc}") from None
    keys = data.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise ApiKeysError(f'{where}: needs a [keys] table of "key" = "tenant" entries')
    out: dict[str, str] = {}
    for key, tenant in keys.items():
        if not isinstance(tenant, str) or not _TENANT.match(tenant):
            raise ApiKeysError(f"{where}: the tenant of a key must match {_TENANT.pattern}")
        if len(key) < _MIN_KEY_CHARS:
            raise ApiKeysError(f"{where}: keys must have at least {_MIN_KEY_CHARS} characters")
        out[_digest(key)] = tenant
    return out


class ApiKeys:
    """The keys file, reloaded when its modification time changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._tenants: dict[str, str] = {}
        self._load()  # a bad file at start is fatal: better than an open gateway

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ApiKeysError(f"cannot read the API keys file {self.path}: {exc}") from None
        self._tenants = parse_keys(text, str(self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._load()
                log.info("reloaded the API keys file %s", self.path)
        except ApiKeysError as exc:
            # Keep the keys we have: a half-written file must not lock everyone out.
            log.error("keeping the previous API keys: %s", exc)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of ``key``, or None for an unknown key."""
        self._maybe_reload()
        return self._tenants.get(_digest(key))


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
