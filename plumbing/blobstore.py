"""Claim-check blob store: pixels live here, events carry references to them.

Two back ends behind one interface: a local directory (``file://`` URIs) and
S3 (``s3://bucket/prefix``, through obstore). Writes are atomic, keys are
deterministic (a redelivered record overwrites, never forks), the sha256 is
recorded on write and verified on read, and references outside the configured
store are refused. Keys are made in :mod:`plumbing.blobkeys`. For retention and
deletion the store lists blobs with their size and age (:meth:`BlobStore.list_info`)
and deletes them; on S3 every write can be encrypted at rest (:class:`Encryption`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from plumbing.blobkeys import blob_key as blob_key  # re-exported: callers import it from here
from plumbing.blobkeys import scene_key as scene_key
from plumbing.errors import PermanentError, StageError, TransientError
from schemas import BlobRef

if TYPE_CHECKING:
    from plumbing.s3blobs import Encryption
    from plumbing.settings import Settings

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


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob: its key, its size in bytes and when it was last written (UTC)."""

    key: str
    size: int
    last_modified: datetime


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
        return sorted(info.key for info in self._list_info(prefix.rstrip("/") + "/"))

    def list_info(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every blob under the folder ``prefix`` (``""``: the whole store), in key order
        (byte order of the UTF-8 keys, as S3 lists them), with its size and age."""
        folder = prefix.rstrip("/")
        if folder:
            _check_key(folder)
        return self._list_info(folder + "/" if folder else "")

    def list_folders(self, prefix: str) -> list[str]:
        """The names of the folders directly under the folder ``prefix``, sorted."""
        _check_key(prefix.rstrip("/"))
        return sorted(self._folders(prefix.rstrip("/") + "/"))

    def exists(self, key: str) -> bool:
        """Whether a blob is stored under ``key``."""
        return self._exists(_check_key(key))

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the blobs under ``keys``; a key with no blob is no error."""
        checked = [_check_key(key) for key in keys]
        if checked:
            self._delete(checked)

    @staticmethod
    def from_settings(settings: Settings) -> BlobStore:
        """The store of ``GENSEG_BLOB_URL``, encrypting S3 writes as ``GENSEG_S3_SSE`` asks."""
        from plumbing.s3blobs import Encryption

        encryption = Encryption.of(settings.s3_sse, settings.s3_kms_key_id)
        return BlobStore.from_url(settings.blob_url, encryption=encryption)

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
    def _list_info(self, prefix: str) -> Iterator[BlobInfo]:
        """Every blob under the folder ``prefix`` (``""`` or ends with ``/``), in key order."""

    @abstractmethod
    def _folders(self, prefix: str) -> list[str]:
        """Folder names directly under the folder ``prefix`` (ends with ``/``)."""

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    @staticmethod
    def from_url(url: str, *, encryption: Encryption | None = None) -> BlobStore:
        """``s3://bucket/prefix`` or a local directory (a path or ``file://`` URL).

        ``encryption`` applies to S3 only; None: ``GENSEG_S3_SSE`` of the environment.
        """
        scheme = urlsplit(url).scheme
        if scheme == "s3":
            from plumbing.s3blobs import S3BlobStore

            return S3BlobStore(url, encryption=encryption)
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
        # Quote '%' too: keys hold %-escapes of their own (plumbing.blobkeys.segment), and
        # key_of must decode exactly one level.
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

    def _list_info(self, prefix: str) -> Iterator[BlobInfo]:
        folder = self._path(prefix) if prefix else self.root
        found = []
        try:
            for path in folder.rglob("*"):
                # In-flight writes are hidden ``.tmp-*`` files; only renamed blobs count.
                if path.name.startswith(".tmp-"):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted while we listed
                    continue
                if not path.is_file():
                    continue
                modified = datetime.fromtimestamp(stat.st_mtime, UTC)
                found.append(
                    BlobInfo(path.relative_to(self.root).as_posix(), stat.st_size, modified)
                )
        except FileNotFoundError:
            return iter(())
        except OSError as exc:
            raise BlobUnavailable(f"could not list {self.uri_for(prefix)}: {exc}") from None
        return iter(sorted(found, key=lambda info: info.key.encode("utf-8")))

    def _folders(self, prefix: str) -> list[str]:
        try:
            return [p.name for p in self._path(prefix).iterdir() if p.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise BlobUnavailable(f"could not list {self.uri_for(prefix)}: {exc}") from None

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _delete(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except IsADirectoryError:
                continue
            except OSError as exc:
                raise BlobUnavailable(f"could not delete {self.uri_for(key)}: {exc}") from None
            folders.update(
                p for p in path.parents if p != self.root and p.is_relative_to(self.root)
            )
        # Empty folders go too (deepest first); one a writer just filled stays (rmdir fails).
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass


def __getattr__(name: str) -> object:
    """``S3BlobStore`` and ``Encryption`` live in :mod:`plumbing.s3blobs` (imported on first
    use: it imports this module) and are part of this one's interface."""
    if name in ("S3BlobStore", "Encryption"):
        from plumbing import s3blobs

        return getattr(s3blobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
