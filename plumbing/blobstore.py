"""Claim-check blob store: pixels live here, events carry references to them.

Two back ends behind one interface: a local directory (``file://`` URIs) and
S3 (``s3://bucket/prefix``, through obstore). Writes are atomic, keys are
deterministic (a redelivered record overwrites, never forks), the sha256 is
recorded on write and verified on read, and references outside the configured
store are refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from plumbing.errors import PermanentError, StageError, TransientError
from schemas import BlobRef

log = logging.getLogger(__name__)


class BlobError(StageError):
    """Base of blob store errors; each is permanent or transient (:mod:`plumbing.errors`)."""

    #: ``error.type`` of the dead-letter event a failure of this kind ends in.
    error_type = "blob_error"


class ForeignBlobRef(BlobError, PermanentError):
    """A reference that points outside the configured store (traversal, other bucket or scheme)."""

    error_type = "foreign_blob_ref"


class BlobNotFound(BlobError, PermanentError):
    """The referenced blob does not exist."""

    error_type = "blob_not_found"


class BlobIntegrityError(BlobError, PermanentError):
    """The blob's bytes do not match the reference's sha256 or size."""

    error_type = "blob_integrity"


class BlobTooLarge(BlobError, PermanentError):
    """The blob is larger than the reader allows."""

    error_type = "blob_too_large"


class BlobUnavailable(BlobError, TransientError):
    """The store could not be reached; worth retrying."""

    error_type = "blob_unavailable"


def _segment(value: str) -> str:
    """Encode one key segment so ids like ``..`` or ``a:b`` stay one safe path component."""
    encoded = "".join(
        ch
        if ch.isascii() and (ch.isalnum() or ch in "_-.")
        else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in value
    )
    if encoded.startswith("."):  # never '.', '..' or a hidden file
        encoded = "%2E" + encoded[1:]
    return encoded or "%00"


def blob_key(request_id: str, image_index: int | None, stage: str, name: str) -> str:
    """The deterministic key of one output: ``{id}/{image_index}/{stage}/{name}``."""
    index = "all" if image_index is None else str(int(image_index))
    return "/".join((_segment(request_id), index, _segment(stage), _segment(name)))


def scene_key(scene_id: str, *names: str) -> str:
    """The key of scene state: ``_scenes/{scene_id}/{names...}``, each segment escaped.

    Request outputs (:func:`blob_key`) always have four segments; scene keys never
    do (``len(names)`` may not be 2), so the two can never name the same blob, even
    for a request whose id is ``_scenes``.
    """
    if len(names) == 2:
        raise ValueError("a scene key has 3 or 5+ segments, never the 4 of request outputs")
    return "/".join(("_scenes", _segment(scene_id), *(_segment(n) for n in names)))


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ForeignBlobRef(f"unsafe blob key {key!r}")
    # '?' and '#' would end the path of an s3:// reference (its key is not quoted).
    if any(ch in key for ch in "\\\x00?#"):
        raise ForeignBlobRef(f"unsafe blob key {key!r}")
    return key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(ABC):
    """Put and get bytes by key; references are :class:`schemas.BlobRef`."""

    #: The store's base URL as configured (``GENSEG_BLOB_URL``).
    url: str

    def put(self, key: str, data: bytes, media_type: str) -> BlobRef:
        """Write ``data`` atomically under ``key`` and return its reference."""
        _check_key(key)
        self._write(key, data, media_type)
        return BlobRef(
            uri=self.uri_for(key), sha256=sha256_hex(data), media_type=media_type, bytes=len(data)
        )

    def get(self, ref: BlobRef, *, max_bytes: int | None = None) -> bytes:
        """Read the blob behind ``ref``, refusing foreign references and corrupted bytes."""
        key = self.key_of(ref.uri)
        if max_bytes is not None and ref.bytes > max_bytes:
            raise BlobTooLarge(f"blob {ref.uri} has {ref.bytes} bytes, limit {max_bytes}")
        # Never read more than the reference announces (plus one byte to see that a
        # blob is longer): a lying reference must not make a reader load a huge blob.
        data = self._read(key, ref.bytes + 1)
        if len(data) > ref.bytes:
            raise BlobIntegrityError(
                f"blob {ref.uri} does not match its reference "
                f"(expected {ref.bytes} bytes, the blob is longer)"
            )
        if len(data) != ref.bytes or sha256_hex(data) != ref.sha256:
            raise BlobIntegrityError(
                f"blob {ref.uri} does not match its reference "
                f"(expected {ref.bytes} bytes sha256 {ref.sha256[:12]}..., "
                f"got {len(data)} bytes sha256 {sha256_hex(data)[:12]}...)"
            )
        return data

    def get_key(self, key: str, *, max_bytes: int) -> bytes:
        """The bytes stored under ``key``, for state that workers write and read by key.

        There is no reference, so no checksum to verify: only for the store's own
        records (scene state), never for blobs named by an event.
        :class:`BlobNotFound` when absent, :class:`BlobTooLarge` past ``max_bytes``.
        """
        _check_key(key)
        data = self._read(key, max_bytes + 1)
        if len(data) > max_bytes:
            raise BlobTooLarge(f"blob {self.uri_for(key)} is larger than {max_bytes} bytes")
        return data

    def list_keys(self, prefix: str) -> list[str]:
        """The keys that start with the folder ``prefix`` (``a/b/``), sorted."""
        _check_key(prefix.rstrip("/"))
        return sorted(self._list(prefix.rstrip("/") + "/"))

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI written into references for ``key``."""

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key inside this store that ``uri`` names; :class:`ForeignBlobRef` otherwise."""

    @abstractmethod
    def _write(self, key: str, data: bytes, media_type: str) -> None: ...

    @abstractmethod
    def _read(self, key: str, limit: int | None = None) -> bytes:
        """The blob's bytes, or only its first ``limit`` bytes when ``limit`` is set."""

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Every key under the folder ``prefix`` (ends with ``/``), in any order."""

    @staticmethod
    def from_url(url: str) -> BlobStore:
        """``s3://bucket/prefix`` or a local directory (a path or ``file://`` URL)."""
        scheme = urlsplit(url).scheme
        if scheme == "s3":
            return S3BlobStore(url)
        if scheme in ("", "file"):
            return LocalBlobStore(url)
        raise ValueError(
            f"unsupported blob store URL {url!r}: use a directory or s3://bucket/prefix"
        )


class LocalBlobStore(BlobStore):
    """Blobs as files under one root directory; atomic by write-then-rename."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        text = os.fspath(url)
        path = unquote(urlsplit(text).path) if text.startswith("file://") else text
        self.root = Path(path).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def uri_for(self, key: str) -> str:
        # Quote '%' too: keys hold %-escapes of their own (see _segment), and key_of
        # must decode exactly one level.
        return f"{self.url}/{quote(key, safe='/')}"

    def key_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        # uri_for never writes a query or fragment: a reference with one is not ours.
        if (
            parts.scheme != "file"
            or parts.netloc not in ("", "localhost")
            or parts.query
            or parts.fragment
        ):
            raise ForeignBlobRef(f"reference {uri[:200]!r} is not in the store {self.url}")
        prefix = urlsplit(self.url).path + "/"
        if not parts.path.startswith(prefix):
            raise ForeignBlobRef(f"reference {uri[:200]!r} is outside the store {self.url}")
        key = unquote(parts.path[len(prefix) :])
        _check_key(key)
        resolved = (self.root / key).resolve()
        if not resolved.is_relative_to(self.root):
            raise ForeignBlobRef(f"reference {uri[:200]!r} escapes the store {self.url}")
        return key

    def _path(self, key: str) -> Path:
        return self.root / key

    def _write(self, key: str, data: bytes, media_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Not tempfile.mkstemp: its files are 0600, and blobs must be readable by
            # whoever may read a file created here (mode 0666 less the umask).
            tmp = path.parent / f".tmp-{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise BlobUnavailable(f"could not write {self.uri_for(key)}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise BlobUnavailable(f"could not write {self.uri_for(key)}: {exc}") from None
            raise

    def _read(self, key: str, limit: int | None = None) -> bytes:
        try:
            with self._path(key).open("rb") as handle:
                if limit is None:
                    return handle.read()
                # read(n) allocates n bytes up front: a reference that claims a huge size
                # must not make the reader ask for that much memory (MemoryError, or worse).
                size = os.fstat(handle.fileno()).st_size
                return handle.read(min(limit, size + 1))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(f"no blob at {self.uri_for(key)}") from None
        except OSError as exc:
            raise BlobUnavailable(f"could not read {self.uri_for(key)}: {exc}") from None

    def _list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        try:
            # In-flight writes are hidden ``.tmp-*`` files; only renamed blobs count.
            return [
                path.relative_to(self.root).as_posix()
                for path in folder.rglob("*")
                if path.is_file() and not path.name.startswith(".tmp-")
            ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BlobUnavailable(f"could not list {self.uri_for(prefix)}: {exc}") from None


class S3BlobStore(BlobStore):
    """Blobs in one S3 bucket under one prefix, through obstore.

    Credentials, region and endpoint come from the standard ``AWS_*`` variables
    (``AWS_ENDPOINT_URL`` for S3-compatible servers, ``AWS_ALLOW_HTTP=true`` for
    plain HTTP on loopback). Retries are kept short: the stage runtime owns
    retry-with-backoff, so a store outage surfaces as :class:`BlobUnavailable`.
    """

    def __init__(self, url: str, *, timeout_s: float = 10.0, max_retries: int = 2) -> None:
        from obstore.store import S3Store

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected s3://bucket/prefix, got {url!r}")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        client_options = {"timeout": timedelta(seconds=timeout_s)}
        if os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"):
            client_options["allow_http"] = True  # type: ignore[assignment]
        self._store = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={
                "max_retries": max_retries,
                "retry_timeout": timedelta(seconds=timeout_s),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=2),
                    "base": 2,
                },
            },
        )

    def uri_for(self, key: str) -> str:
        return f"{self.url}/{key}"

    def key_of(self, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self.bucket or parts.query or parts.fragment:
            raise ForeignBlobRef(f"reference {uri[:200]!r} is not in the store {self.url}")
        path = parts.path.lstrip("/")
        prefix = f"{self.prefix}/" if self.prefix else ""
        if not path.startswith(prefix):
            raise ForeignBlobRef(f"reference {uri[:200]!r} is outside the store {self.url}")
        return _check_key(path[len(prefix) :])

    def _write(self, key: str, data: bytes, media_type: str) -> None:
        import obstore

        try:
            obstore.put(self._store, key, data, attributes={"Content-Type": media_type})
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not write {self.uri_for(key)}: {_first_line(exc)}"
            ) from None

    def _read(self, key: str, limit: int | None = None) -> bytes:
        import obstore

        try:
            result = obstore.get(self._store, key)
            if limit is None or result.meta["size"] <= limit:
                return bytes(result.bytes())
            # Longer than wanted: read only the first ``limit`` bytes of the body.
            data = bytearray()
            for chunk in result.stream(min_chunk_size=min(limit, 1 << 20) or 1):
                data += chunk
                if len(data) >= limit:
                    break
            return bytes(data[:limit])
        except (FileNotFoundError, obstore.exceptions.NotFoundError):
            raise BlobNotFound(f"no blob at {self.uri_for(key)}") from None
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not read {self.uri_for(key)}: {_first_line(exc)}"
            ) from None

    def _list(self, prefix: str) -> list[str]:
        import obstore

        try:
            # Paths come back relative to the store's prefix, like the keys written.
            return [
                meta["path"] for batch in obstore.list(self._store, prefix=prefix) for meta in batch
            ]
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not list {self.uri_for(prefix)}: {_first_line(exc)}"
            ) from None


def _first_line(exc: BaseException) -> str:
    """obstore's messages carry a multi-line debug dump; its first line says it all."""
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
