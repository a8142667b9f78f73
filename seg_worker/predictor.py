"""segment-anything backend: a SAM predictor with an embedding cache.

The image encoder runs once per image view (see :mod:`seg_worker.embedding`).
:class:`CachedPredictor` is a :class:`segment_anything.SamPredictor`: it uses the
predictor's own resize transform, pre-processing and prompt encoder and mask decoder,
and :meth:`CachedPredictor.bound` lets :class:`SamAutomaticMaskGenerator` (which
calls ``set_image`` itself) use a cached embedding too. It is the ``sam`` backend of
:class:`seg_worker.backend.SegBackend`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from seg_worker.backend import MODES, Instance, UnsupportedMode
from seg_worker.embedding import CachedEncoder, Embedding, EmbeddingCache, EmbedKey

log = logging.getLogger(__name__)

__all__ = ["CachedPredictor", "EmbedKey", "Embedding", "EmbeddingCache"]


class CachedPredictor(CachedEncoder, SamPredictor):
    """A SamPredictor whose image embeddings come from an :class:`EmbeddingCache`.

    ``encoder_images`` counts images run through the encoder, ``encoder_batches``
    the encoder forward passes. One lock serialises model use: the predictor
    holds per-image state (``features``), so concurrent callers would race.

    ``dtype`` (``GENSEG_SEG_DTYPE``; None: fp32): the encoder and decoder passes run
    under ``torch.autocast`` to it over the fp32 weights, as SAM 2's own predictor
    runs bf16. Autocast keeps its reductions (softmax, norms) in fp32, which casting
    the weights would not. What leaves the passes is fp32: the embeddings (the
    encoder's last norm scales by fp32 weights), logits and IoUs.
    """

    name = "sam"
    modes = MODES["sam"]

    def __init__(
        self, model: Sam, *, cache_bytes: int = 256 * 2**20, dtype: torch.dtype | None = None
    ) -> None:
        SamPredictor.__init__(self, model)
        self._init_cache(cache_bytes)
        self._bound: Embedding | None = None
        self.dtype = dtype

    def _precision(self) -> AbstractContextManager[object]:
        """Autocast to :attr:`dtype` on the model's device (nothing for fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def mask_threshold(self) -> float:
        return float(self.model.mask_threshold)

    # --- embeddings ----------------------------------------------------------------

    @torch.inference_mode()
    def _encode(self, views: list[np.ndarray]) -> list[Embedding]:
        """Run the image encoder once on a batch of ``[H, W, 3]`` uint8 RGB views."""
        inputs, sizes = [], []
        for view in views:
            resized = self.transform.apply_image(view)  # long side -> img_size
            tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            inputs.append(self.model.preprocess(tensor[None])[0])  # normalise + pad
            sizes.append((tuple(resized.shape[:2]), tuple(view.shape[:2])))
        with self._precision():
            features = self.model.image_encoder(torch.stack(inputs))
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
                self.use(self.encode([np.ascontiguousarray(image)])[0])

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
            # The prompt encoder stays fp32: point positions go through its Fourier
            # features, which half precision would blur; it costs microseconds.
            sparse, dense = self.model.prompt_encoder(points=points_in, boxes=boxes, masks=None)
            image_pe = self.model.prompt_encoder.get_dense_pe()
            with self._precision():
                low_res, ious = self.model.mask_decoder(
                    image_embeddings=emb.features,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
            # fp32 out: a bilinear upsampling of half-precision logits would move mask
            # edges where the logits cross the threshold.
            return low_res[0].float(), ious[0].float().cpu().numpy()

    def predict_torch(
        self, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SamPredictor.predict_torch (what SamAutomaticMaskGenerator calls) under
        :attr:`dtype`'s autocast, its floating-point outputs in fp32: the generator
        hands them to numpy, which has no bf16."""
        with self._precision():
            outputs = super().predict_torch(*args, **kwargs)
        masks, ious, low_res = (t.float() if t.is_floating_point() else t for t in outputs)
        return masks, ious, low_res

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

    # --- modes beyond prompts -------------------------------------------------------

    def automatic(
        self,
        emb: Embedding,
        image: np.ndarray,
        *,
        points_per_side: int,
        points_per_batch: int,
        pred_iou_thresh: float,
        stability_thresh: float,
    ) -> list[tuple[float, np.ndarray]]:
        """SamAutomaticMaskGenerator on ``image`` with ``emb`` (its cached embedding):
        (predicted IoU, ``[H, W]`` bool mask) per object found."""
        generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_thresh,
            output_mode="binary_mask",
        )
        generator.predictor = self  # so set_image goes through the cache
        with self.bound(emb):
            records = generator.generate(image)
        return [(float(r["predicted_iou"]), np.asarray(r["segmentation"], bool)) for r in records]

    def concept(
        self,
        emb: Embedding,
        text: str,
        out_size: tuple[int, int],
        *,
        min_score: float,
        max_instances: int,
    ) -> list[Instance]:
        raise UnsupportedMode("concept", self.name)
