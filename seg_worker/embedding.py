"""Image embeddings and their cache, shared by every segmenter backend.

The image encoder is almost all of a SAM model's cost (a ViT-H or Hiera-L
forward pass against a prompt-decoder pass of a few milliseconds). An image view
(one image at one pyramid scale, or one crop of it) is identified by an
:data:`EmbedKey` ``(sha256, scale, crop)``; its embedding is kept in a
memory-bounded LRU, so every further target, prompt or request on the same image
reuses it. Each backend owns its cache (one per loaded model), so a key never
meets an embedding of another backend or checkpoint.

:class:`CachedEncoder` is the part every backend shares: look up, encode the
misses in batches, count encoder work. A backend supplies ``_encode``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: ``(image sha256, pyramid scale, crop (x0, y0, x1, y1) in image pixels or None)``.
EmbedKey = tuple[str, float, tuple[int, int, int, int] | None]

#: A view as an array, or a callable that makes it (only called on a cache miss).
LazyView = np.ndarray | Callable[[], np.ndarray]


@dataclass(frozen=True)
class Embedding:
    """Encoder output for one image view.

    ``features`` is one tensor (segment-anything: ``[1, 256, 64, 64]``) or a tuple of
    tensors (SAM 2.1: three feature levels), on the model's device.
    """

    features: torch.Tensor | tuple[torch.Tensor, ...]
    input_size: tuple[int, int]  # (h, w) of the view as the encoder saw it, pixels
    original_size: tuple[int, int]  # (h, w) of the view as given, pixels

    @property
    def nbytes(self) -> int:
        tensors = self.features if isinstance(self.features, tuple) else (self.features,)
        return sum(t.element_size() * t.nelement() for t in tensors)


class EmbeddingCache:
    """LRU of embeddings bounded by their total size in bytes. Thread-safe.

    It also knows which requests each cached image belongs to (:meth:`tag`), so that a
    deleted request's embeddings can be dropped (:meth:`drop_request`); the tags of an
    image go with its last embedding.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[EmbedKey, Embedding] = OrderedDict()
        self._lock = threading.Lock()
        self._per_image: dict[str, int] = {}  # image sha256 -> embeddings cached
        self._owners: dict[str, set[str]] = {}  # image sha256 -> request ids
        self._images: dict[str, set[str]] = {}  # request id -> image sha256s
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: EmbedKey) -> bool:
        return key in self._items

    def get(self, key: EmbedKey) -> Embedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: EmbedKey, item: Embedding) -> None:
        """Insert ``item``, evicting the least recently used until it fits.

        An item larger than the whole bound is not kept (it would evict everything).
        """
        with self._lock:
            if key in self._items:
                self._remove(key)
            if item.nbytes > self.max_bytes:
                return
            while self._items and self.bytes + item.nbytes > self.max_bytes:
                self._remove(next(iter(self._items)))
                self.evictions += 1
            self._items[key] = item
            self.bytes += item.nbytes
            self._per_image[key[0]] = self._per_image.get(key[0], 0) + 1

    def _remove(self, key: EmbedKey) -> None:
        """Drop ``key`` (the lock held); an image's request tags go with its last view."""
        self.bytes -= self._items.pop(key).nbytes
        sha = key[0]
        self._per_image[sha] -= 1
        if self._per_image[sha] == 0:
            del self._per_image[sha]
            for request_id in self._owners.pop(sha, ()):
                images = self._images.get(request_id)
                if images is not None:
                    images.discard(sha)
                    if not images:
                        del self._images[request_id]

    def tag(self, sha256: str, request_id: str) -> None:
        """Note that the cached image ``sha256`` is one of ``request_id``'s."""
        with self._lock:
            if sha256 in self._per_image:
                self._owners.setdefault(sha256, set()).add(request_id)
                self._images.setdefault(request_id, set()).add(sha256)

    def drop_request(self, request_id: str) -> int:
        """Drop every embedding of ``request_id``'s images (it was deleted); how many."""
        with self._lock:
            shas = self._images.get(request_id, set())
            keys = [key for key in self._items if key[0] in shas]
            for key in keys:
                self._remove(key)
            self._images.pop(request_id, None)
            return len(keys)

    def images_of(self, request_id: str) -> set[str]:
        """The cached images (sha256) tagged with ``request_id``."""
        with self._lock:
            return set(self._images.get(request_id, ()))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._per_image.clear()
            self._owners.clear()
            self._images.clear()
            self.bytes = 0


class CachedEncoder:
    """Embeddings through an :class:`EmbeddingCache`; subclasses implement ``_encode``.

    ``encoder_images`` counts images run through the encoder, ``encoder_batches`` the
    encoder forward passes. ``lock`` serialises model use (a backend may hold
    per-image state, and one model on one device gains nothing from two callers).
    """

    cache: EmbeddingCache
    encoder_images: int
    encoder_batches: int
    lock: threading.RLock

    def _init_cache(self, cache_bytes: int) -> None:
        self.cache = EmbeddingCache(cache_bytes)
        self.encoder_images = 0
        self.encoder_batches = 0
        self.lock = threading.RLock()

    def _encode(self, views: list[np.ndarray]) -> list[Embedding]:
        """Run the image encoder once on a batch of ``[H, W, 3]`` uint8 RGB views."""
        raise NotImplementedError

    def encode(self, views: list[np.ndarray]) -> list[Embedding]:
        """:meth:`_encode`, counted (no cache: :meth:`embed_many` is the cached way)."""
        with self.lock:
            embeddings = self._encode(views)
            self.encoder_images += len(views)
            self.encoder_batches += 1
            return embeddings

    def embed(self, key: EmbedKey, view: LazyView) -> Embedding:
        """The embedding of ``view`` (``[H, W, 3]`` uint8 RGB, or a callable making it)."""
        return self.embed_many([(key, view)])[0]

    def embed_many(
        self, items: Sequence[tuple[EmbedKey, LazyView]], *, batch_size: int = 1
    ) -> list[Embedding]:
        """Embeddings of several views; cache misses are encoded ``batch_size`` at a time.

        A view given as a callable is only built on a miss (a resized pyramid level
        costs a resize even when cached otherwise).
        """
        with self.lock:
            found: dict[EmbedKey, Embedding] = {}
            missing: list[tuple[EmbedKey, LazyView]] = []
            for key, view in items:
                if key in found or any(key == k for k, _ in missing):
                    continue
                hit = self.cache.get(key)
                if hit is not None:
                    found[key] = hit
                else:
                    missing.append((key, view))
            step = max(1, batch_size)
            for start in range(0, len(missing), step):
                chunk = missing[start : start + step]
                views = [v() if callable(v) else v for _, v in chunk]
                for (key, _), emb in zip(chunk, self.encode(views), strict=True):
                    self.cache.put(key, emb)
                    found[key] = emb
            return [found[key] for key, _ in items]


def writable(views: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``views``, copying the read-only ones (a decoded PNG is): torch warns when an image
    processor wraps a read-only array, and would share memory it must not write."""
    return [v if v.flags.writeable else v.copy() for v in views]
