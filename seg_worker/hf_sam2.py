"""``sam2`` backend: the SAM 2.1 image predictor through transformers' ``Sam2Model``.

SAM 2.1's processor resizes every view to its square input (1024 px; no padding,
the aspect ratio is not kept), so a point ``(x, y)`` of a ``W x H`` frame becomes
``(x * S / W, y * S / H)`` and the low-res logits (``S / 4`` square) cover the
whole view: upsampling them to any frame is one bilinear resize (the processor's
``post_process_masks``). The embedding is the three feature levels the mask
decoder reads (``[1, 32, S/4, S/4]``, ``[1, 64, S/8, S/8]``, ``[1, 256, S/16,
S/16]``: 16 MiB in fp32 at 1024 px), cached like segment-anything's.

``auto`` is a grid of point prompts filtered like SamAutomaticMaskGenerator
(:mod:`seg_worker.grid`). Concepts are SAM 3's (:class:`UnsupportedMode`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import Sam2ImageProcessor, Sam2Model

from seg_worker.backend import MODES, Instance, UnsupportedMode
from seg_worker.embedding import CachedEncoder, Embedding, writable
from seg_worker.grid import grid_masks
from seg_worker.hf_configs import TINY_SAM2_SIZE, sam2_arch_of, sam2_config, tiny_sam2_config

log = logging.getLogger(__name__)


def sam2_processor(side: int) -> Sam2ImageProcessor:
    """SAM 2.1's image processor for a ``side`` px square input (masks at ``side / 4``)."""
    return Sam2ImageProcessor(
        size={"height": side, "width": side},
        mask_size={"height": side // 4, "width": side // 4},
    )


def build_sam2(arch: str, *, seed: int = 0) -> tuple[Sam2Model, Sam2ImageProcessor]:
    """SAM 2.1 with seeded random weights, eval mode, CPU: ``tiny`` (the tiny
    configuration) or a released size named like ``SAM2_MODEL``
    (``facebook/sam2.1-hiera-large``, ``...-tiny``...). The caller's RNG is untouched."""
    if arch == "tiny":
        config, side = tiny_sam2_config(), TINY_SAM2_SIZE
    else:
        hiera = sam2_arch_of(arch)
        config, side = sam2_config(hiera), hiera.image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2Model(config)
    return _inference(model), sam2_processor(side)


def load_sam2(source: str) -> tuple[Sam2Model, Sam2ImageProcessor]:
    """``from_pretrained`` of a directory or hub id (model and, when saved, its image
    processor; else the processor of the model's input size)."""
    model = Sam2Model.from_pretrained(source)
    try:
        processor = Sam2ImageProcessor.from_pretrained(source)
    except OSError:  # a directory holding the model only
        processor = sam2_processor(int(model.config.prompt_encoder_config.image_size))
    log.info("loaded SAM 2.1 from %s", source)
    return _inference(model), processor


def _inference(model: Sam2Model) -> Sam2Model:
    model.eval()
    model.requires_grad_(False)
    return model


class Sam2Backend(CachedEncoder):
    """SAM 2.1 point and box prompts with cached image embeddings (a ``SegBackend``)."""

    name = "sam2"
    modes = MODES["sam2"]

    def __init__(
        self,
        model: Sam2Model,
        processor: Sam2ImageProcessor,
        *,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        self.model = model
        self.processor = processor
        self.side = int(model.config.prompt_encoder_config.image_size)
        self._init_cache(cache_bytes)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def mask_threshold(self) -> float:
        return 0.0

    @torch.inference_mode()
    def _encode(self, views: list[np.ndarray]) -> list[Embedding]:
        pixels = self.processor(images=writable(views), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        levels = self.model.get_image_embeddings(pixels)
        # clone: a slice would keep the whole batch's storage alive in the cache
        return [
            Embedding(
                tuple(level[i : i + 1].clone() for level in levels),
                (self.side, self.side),
                (int(view.shape[0]), int(view.shape[1])),
            )
            for i, view in enumerate(views)
        ]

    @torch.inference_mode()
    def _decode(
        self,
        emb: Embedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        frame_size: tuple[int, int],
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits ``[P, C, S/4, S/4]`` and IoUs ``[P, C]`` of ``P`` prompts:
        ``points`` ``[P, N, 2]`` with ``labels`` ``[P, N]``, and/or ``boxes`` ``[P, 4]``,
        in pixels of a ``frame_size`` frame covering the view."""
        assert isinstance(emb.features, tuple)
        scale = np.array([self.side / frame_size[1], self.side / frame_size[0]], np.float32)
        kwargs: dict[str, torch.Tensor] = {}
        if points is not None and len(points) and points.shape[1]:
            kwargs["input_points"] = self._tensor(points * scale)[None]
            kwargs["input_labels"] = torch.as_tensor(labels, device=self.device).long()[None]
        if boxes is not None:
            kwargs["input_boxes"] = self._tensor(boxes * np.tile(scale, 2))[None]
        with self.lock:
            out = self.model(
                image_embeddings=list(emb.features), multimask_output=multimask, **kwargs
            )
        return out.pred_masks[0], out.iou_scores[0]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, np.float32), device=self.device)

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
        """Low-res logits ``[C, S/4, S/4]`` and predicted IoUs ``[C]`` of one prompt."""
        low, ious = self._decode(
            emb,
            None if points is None else np.asarray(points, np.float32)[None],
            None if point_labels is None else np.asarray(point_labels)[None],
            None if box is None else np.asarray(box, np.float32)[None],
            frame_size,
            multimask,
        )
        return low[0], ious[0].float().cpu().numpy()

    @torch.inference_mode()
    def upsample(
        self, emb: Embedding, low_res: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        """``[K, S/4, S/4]`` -> ``[K, H, W]`` float32 CPU (the view is the whole square)."""
        (masks,) = self.processor.post_process_masks(
            [low_res[None].float()], [out_size], binarize=False
        )
        return masks[0].cpu()

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
        """A ``points_per_side``² grid of single-point prompts over ``image``."""
        size = (int(image.shape[0]), int(image.shape[1]))

        def predict(points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            labels = np.ones((len(points), 1), np.int64)
            return self._decode(emb, points[:, None], labels, None, size, True)

        return grid_masks(
            predict,
            lambda low: self.upsample(emb, low, size),
            size,
            mask_threshold=self.mask_threshold,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_thresh=stability_thresh,
        )

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
