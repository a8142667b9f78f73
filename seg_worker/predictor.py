"""SAM predictor with an embedding cache: the image encoder runs once per image view.

The image encoder is almost all of SAM's cost (a ViT-H forward pass against a
prompt-encoder + mask-decoder pass of a few milliseconds). An image view (one
image at one pyramid scale, or one crop of it) is identified by an
:data:`EmbedKey` ``(sha256, scale, crop)``; its features are kept in a
memory-bounded LRU cache, so every further target, prompt or request on the same
image reuses them.

:class:`CachedPredictor` is a :class:`segment_anything.SamPredictor`: it uses the
predictor's own resize transform, pre-processing and ``predict_torch``, and
:meth:`CachedPredictor.bound` lets :class:`SamAutomaticMaskGenerator` (which
calls ``set_image`` itself) use a cached embedding too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

log = logging.getLogger(__name__)

#: ``(image sha256, pyramid scale, crop (x0, y0, x1, y1) in image pixels or None)``.
EmbedKey = tuple[str, float, tuple[int, int, int, int] | None]


@dataclass(frozen=True)
class Embedding:
    """Encoder output for one image view."""

    features: torch.Tensor  # [1, C, h, w] on the model's device (C=256, h=w=64 for ViT)
    input_size: tuple[int, int]  # (h, w) of the resized view inside the padded encoder input
    original_size: tuple[int, int]  # (h, w) of the view as given, pixels

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


class EmbeddingCache:
    """LRU of embeddings bounded by their total size in bytes. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[EmbedKey, Embedding] = OrderedDict()
        self._lock = threading.Lock()
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
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if item.nbytes > self.max_bytes:
                return
            while self._items and self.bytes + item.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._items[key] = item
            self.bytes += item.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


class CachedPredictor(SamPredictor):
    """A SamPredictor whose image embeddings come from an :class:`EmbeddingCache`.

    ``encoder_images`` counts images run through the encoder, ``encoder_batches``
    the encoder forward passes. One lock serialises model use: the predictor
    holds per-image state (``features``), so concurrent callers would race.
    """

    def __init__(self, model: Sam, *, cache_bytes: int = 256 * 2**20) -> None:
        super().__init__(model)
        self.cache = EmbeddingCache(cache_bytes)
        self.encoder_images = 0
        self.encoder_batches = 0
        self.lock = threading.RLock()
        self._bound: Embedding | None = None

    # --- embeddings ----------------------------------------------------------------

    def embed(self, key: EmbedKey, view: np.ndarray | Callable[[], np.ndarray]) -> Embedding:
        """The embedding of ``view`` (``[H, W, 3]`` uint8 RGB, or a callable making it)."""
        return self.embed_many([(key, view)])[0]

    def embed_many(
        self,
        items: Sequence[tuple[EmbedKey, np.ndarray | Callable[[], np.ndarray]]],
        *,
        batch_size: int = 1,
    ) -> list[Embedding]:
        """Embeddings of several views; cache misses are encoded ``batch_size`` at a time.

        Any views can share a batch: SAM pads every input to the same
        ``img_size`` square. A view given as a callable is only built on a miss
        (a resized pyramid level costs a resize even when cached otherwise).
        """
        with self.lock:
            found: dict[EmbedKey, Embedding] = {}
            missing: list[tuple[EmbedKey, np.ndarray | Callable[[], np.ndarray]]] = []
            for key, view in items:
                if key in found or any(key == k for k, _ in missing):
                    continue
                hit = self.cache.get(key)
                if hit is not None:
                    found[key] = hit
                else:
                    missing.append((key, view))
            for start in range(0, len(missing), max(1, batch_size)):
                chunk = missing[start : start + max(1, batch_size)]
                views = [v() if callable(v) else v for _, v in chunk]
                for (key, _), emb in zip(chunk, self._encode(views), strict=True):
                    self.cache.put(key, emb)
                    found[key] = emb
            return [found[key] for key, _ in items]

    @torch.inference_mode()
    def _encode(self, views: list[np.ndarray]) -> list[Embedding]:
        """Run the image encoder once on a batch of ``[H, W, 3]`` uint8 RGB views."""
        inputs, sizes = [], []
        for view in views:
            resized = self.transform.apply_image(view)  # long side -> img_size
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            inputs.append(self.model.preprocess(tensor[None])[0])  # normalise + pad
            sizes.append((tuple(resized.shape[:2]), tuple(view.shape[:2])))
        features = self.model.image_encoder(torch.stack(inputs))
        self.encoder_images += len(views)
        self.encoder_batches += 1
        # clone: a slice would keep the whole batch's storage alive in the cache
        return [
            Embedding(features[i : i + 1].clone(), input_size, original_size)
            for i, (input_size, original_size) in enumerate(sizes)
        ]

    def use(self, emb: Embedding) -> None:
        """Make ``emb`` the predictor's current image (what ``set_image`` would do)."""
        self.features = emb.features
        self.input_size = emb.input_size
        self.original_size = emb.original_size
        self.is_image_set = True

    @contextmanager
    def bound(self, emb: Embedding) -> Iterator[CachedPredictor]:
        """While open, ``set_image`` uses ``emb`` instead of running the encoder.

        For SamAutomaticMaskGenerator, which calls ``set_image`` itself. The image it
        passes must be the view ``emb`` was computed from (its size is checked).
        """
        with self.lock:
            self._bound = emb
            try:
                yield self
            finally:
                self._bound = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """SamPredictor.set_image, served from :meth:`bound`'s embedding when open."""
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        with self.lock:
            if self._bound is not None:
                if tuple(image.shape[:2]) != self._bound.original_size:
                    raise ValueError(
                        f"set_image got a {image.shape[:2]} image while bound to an "
                        f"embedding of a {self._bound.original_size} view"
                    )
                self.use(self._bound)
            else:
                self.use(self._encode([np.ascontiguousarray(image)])[0])

    # --- prediction ----------------------------------------------------------------

    @torch.inference_mode()
    def predict_low_res(
        self,
        emb: Embedding,
        *,
        points: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        frame_size: tuple[int, int],
        multimask: bool = True,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """SAM's low-res mask logits ``[C, 4h, 4w]`` (on the model's device; 256x256 for
        the real models) and predicted IoUs ``[C]`` (C = 3 with ``multimask``, else 1).

        Prompts are in pixels of a ``frame_size`` = (H, W) frame that covers the whole
        encoded view (the full image for any pyramid scale; the crop for a crop).
        This is ``SamPredictor.predict_torch`` without its upsampling, so a caller
        upsamples only the output it keeps (:meth:`upsample`).
        """
        with self.lock:
            self.use(emb)
            sx = emb.input_size[1] / frame_size[1]
            sy = emb.input_size[0] / frame_size[0]
            scale = torch.tensor([sx, sy], dtype=torch.float32, device=self.device)
            points_in = boxes = None
            if points is not None and len(points):
                coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)
                labels = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)
                points_in = ((coords * scale)[None], labels[None])
            if box is not None:
                boxes = torch.as_tensor(box, dtype=torch.float32, device=self.device)
                boxes = (boxes.view(2, 2) * scale).view(1, 4)
            sparse, dense = self.model.prompt_encoder(points=points_in, boxes=boxes, masks=None)
            low_res, ious = self.model.mask_decoder(
                image_embeddings=emb.features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            return low_res[0], ious[0].float().cpu().numpy()

    @torch.inference_mode()
    def upsample(
        self, emb: Embedding, low_res: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits ``[K, 4h, 4w]`` of ``emb``'s view -> logits ``[K, H, W]`` at
        ``out_size`` (float32, CPU): SAM's ``postprocess_masks`` (pad removed), one
        bilinear upsampling from the low-res grid straight to the output frame."""
        masks = self.model.postprocess_masks(low_res[None], emb.input_size, out_size)
        return masks[0].float().cpu()

    def predict_logits(
        self,
        emb: Embedding,
        *,
        points: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        out_size: tuple[int, int],
        multimask: bool = True,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Mask logits ``[C, H, W]`` (float32, CPU) of every output at ``out_size`` and
        the predicted IoUs ``[C]``; see :meth:`predict_low_res` for the prompt frame."""
        low_res, ious = self.predict_low_res(
            emb,
            points=points,
            point_labels=point_labels,
            box=box,
            frame_size=out_size,
            multimask=multimask,
        )
        return self.upsample(emb, low_res, out_size), ious
