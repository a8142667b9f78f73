"""The S3 back end of the blob store (through obstore), and its encryption at rest.

Imported by :mod:`plumbing.blobstore`, whose interface it implements; import both
names from there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

from plumbing.blobstore import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobUnavailable,
    ForeignBlobRef,
    _check_key,
)

SseAlgorithm = Literal["AES256", "aws:kms"]


@dataclass(frozen=True)
class Encryption:
    """Server-side encryption of every S3 write: SSE-S3 (``AES256``) or SSE-KMS
    (``aws:kms``, with the bucket's default key unless ``kms_key_id`` names one)."""

    algorithm: SseAlgorithm
    kms_key_id: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ("AES256", "aws:kms"):
            raise ValueError(f"GENSEG_S3_SSE={self.algorithm!r}: expected AES256 or aws:kms")
        if self.kms_key_id and self.algorithm != "aws:kms":
            raise ValueError("GENSEG_S3_KMS_KEY_ID needs GENSEG_S3_SSE=aws:kms")

    @staticmethod
    def of(algorithm: str | None, kms_key_id: str | None = None) -> Encryption | None:
        """The encryption these settings ask for; None when ``algorithm`` is unset."""
        if not algorithm:
            if kms_key_id:
                raise ValueError("GENSEG_S3_KMS_KEY_ID needs GENSEG_S3_SSE=aws:kms")
            return None
        return Encryption(algorithm, kms_key_id or None)  # type: ignore[arg-type]

    @staticmethod
    def from_env() -> Encryption | None:
        """``GENSEG_S3_SSE`` and ``GENSEG_S3_KMS_KEY_ID`` of this process."""
        return Encryption.of(
            os.environ.get("GENSEG_S3_SSE"), os.environ.get("GENSEG_S3_KMS_KEY_ID")
        )

    def s3_config(self) -> dict[str, str]:
        """obstore's ``S3Store`` configuration for it."""
        config = {"server_side_encryption": self.algorithm}
        if self.kms_key_id:
            config["sse_kms_key_id"] = self.kms_key_id
        return config


class S3BlobStore(BlobStore):
    """Blobs in one S3 bucket under one prefix, through obstore.

    Credentials, region and endpoint come from the standard ``AWS_*`` variables
    (``AWS_ENDPOINT_URL`` for S3-compatible servers, ``AWS_ALLOW_HTTP=true`` for
    plain HTTP on loopback). Retries are kept short: the stage runtime owns
    retry-with-backoff, so a store outage surfaces as :class:`BlobUnavailable`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 2,
        encryption: Encryption | None = None,
    ) -> None:
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
        #: Server-side encryption of every write (None: the bucket's default).
        self.encryption = encryption if encryption is not None else Encryption.from_env()
        self._store = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            config=self.encryption.s3_config() if self.encryption else None,  # type: ignore[arg-type]
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

    def _list_info(self, prefix: str) -> Iterator[BlobInfo]:
        import obstore

        try:
            # Paths come back relative to the store's prefix, like the keys written, in
            # S3's order (UTF-8 byte order), a page at a time.
            for batch in obstore.list(self._store, prefix=prefix or None):
                for meta in batch:
                    yield BlobInfo(meta["path"], meta["size"], meta["last_modified"])
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not list {self.uri_for(prefix)}: {_first_line(exc)}"
            ) from None

    def _folders(self, prefix: str) -> list[str]:
        import obstore

        try:
            listed = obstore.list_with_delimiter(self._store, prefix=prefix)
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not list {self.uri_for(prefix)}: {_first_line(exc)}"
            ) from None
        return [folder.rstrip("/").rsplit("/", 1)[-1] for folder in listed["common_prefixes"]]

    def _exists(self, key: str) -> bool:
        import obstore

        try:
            obstore.head(self._store, key)
        except (FileNotFoundError, obstore.exceptions.NotFoundError):
            return False
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not read {self.uri_for(key)}: {_first_line(exc)}"
            ) from None
        return True

    def _delete(self, keys: list[str]) -> None:
        import obstore

        try:
            obstore.delete(self._store, keys)  # DeleteObjects, 1,000 keys a request
        except (obstore.exceptions.BaseError, OSError) as exc:
            raise BlobUnavailable(
                f"could not delete {len(keys)} blobs under {self.url}: {_first_line(exc)}"
            ) from None


def _first_line(exc: BaseException) -> str:
    """obstore's messages carry a multi-line debug dump; its first line says it all."""
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
