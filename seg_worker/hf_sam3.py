"""``sam3`` backend: instance masks for a text concept through transformers' ``Sam3Model``.

SAM 3's detector takes an image and a noun phrase ("red cup") and returns every
instance it finds: ``Q`` queries (200 in the released model), each with a box, a
mask (``[S/14 * 4]``² low-res logits over the square input, 288² at 1008 px) and a
score ``sigmoid(logit) * sigmoid(presence)`` (the processor's
``post_process_instance_segmentation``). No heat map, no point: it works on any
image.

Cache: the ViT backbone is almost all of the cost, and its output
(``[1, 1024, 72, 72]``, 21 MiB fp32 at 1008 px) is what is cached per view; the FPN
neck (4 levels of 256 channels, over 100 MiB at that size) is recomputed from it,
once per image: the last one is kept while targets of the same image follow.
Text features are kept per phrase in a small LRU. Point and box prompts are not
served (:class:`UnsupportedMode`): transformers ships them as a separate model
(``Sam3TrackerModel``); see docs/seg_worker.md.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from seg_worker.backend import MODES, Instance, UnsupportedMode
from seg_worker.embedding import CachedEncoder, Embedding, writable
from seg_worker.hf_configs import (
    SAM3_TEXT_LENGTH,
    SAM3_VOCAB_SIZE,
    TINY_SAM3_SIZE,
    byte_clip_tokenizer,
    sam3_config,
    tiny_sam3_config,
)

log = logging.getLogger(__name__)

#: Phrases whose text features are kept.
TEXT_CACHE_SIZE = 256


def sam3_processor(side: int, vocab_size: int | None = None) -> Sam3Processor:
    """SAM 3's processor for a ``side`` px input with the byte-level tokenizer."""
    images = Sam3ImageProcessor(
        size={"height": side, "width": side},
        mask_size={"height": side // 14 * 4, "width": side // 14 * 4},
    )
    return Sam3Processor(image_processor=images, tokenizer=byte_clip_tokenizer(vocab_size))


def build_sam3(arch: str, *, seed: int = 0) -> tuple[Sam3Model, Sam3Processor]:
    """SAM 3 with seeded random weights, eval mode, CPU: ``tiny`` or ``full`` (the
    released architecture). The caller's RNG is untouched."""
    if arch not in ("tiny", "full"):
        raise ValueError(f"unknown SAM 3 architecture {arch!r}; expected tiny or full")
    if arch == "tiny":
        processor = sam3_processor(TINY_SAM3_SIZE)
        config = tiny_sam3_config(processor.tokenizer)
    else:
        processor = sam3_processor(int(sam3_config().image_size), SAM3_VOCAB_SIZE)
        config = sam3_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3Model(config)
    return _inference(model), processor


def load_sam3(source: str) -> tuple[Sam3Model, Sam3Processor]:
    """``from_pretrained`` of a directory or hub id holding the model and its processor
    (image processor and CLIP tokenizer)."""
    model = Sam3Model.from_pretrained(source)
    processor = Sam3Processor.from_pretrained(source)
    log.info("loaded SAM 3 from %s", source)
    return _inference(model), processor


def _inference(model: Sam3Model) -> Sam3Model:
    model.eval()
    model.requires_grad_(False)
    return model


class Sam3Backend(CachedEncoder):
    """SAM 3 text-concept instances with cached backbone features (a ``SegBackend``)."""

    name = "sam3"
    modes = MODES["sam3"]

    def __init__(
        self, model: Sam3Model, processor: Sam3Processor, *, cache_bytes: int = 256 * 2**20
    ) -> None:
        self.model = model
        self.processor = processor
        backbone = model.config.vision_config.backbone_config
        self.side = int(backbone.image_size)
        self.grid = self.side // int(backbone.patch_size)
        self._init_cache(cache_bytes)
        self._neck: tuple[Embedding, Sam3VisionEncoderOutput] | None = None
        self._texts: OrderedDict[str, tuple[BaseModelOutputWithPooling, torch.Tensor]] = (
            OrderedDict()
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def mask_threshold(self) -> float:
        return 0.0  # logits; the processor's 0.5 after a sigmoid

    @torch.inference_mode()
    def _encode(self, views: list[np.ndarray]) -> list[Embedding]:
        """The ViT backbone on a batch of views: ``[1, C, S/14, S/14]`` each."""
        pixels = self.processor.image_processor(images=writable(views), return_tensors="pt")
        pixels = pixels["pixel_values"].to(self.device, self.model.dtype)
        tokens = self.model.vision_encoder.backbone(pixels).last_hidden_state  # [B, N, C]
        spatial = tokens.view(len(views), self.grid, self.grid, -1).permute(0, 3, 1, 2)
        return [
            Embedding(
                spatial[i : i + 1].clone(),
                (self.side, self.side),
                (int(view.shape[0]), int(view.shape[1])),
            )
            for i, view in enumerate(views)
        ]

    def _vision(self, emb: Embedding) -> Sam3VisionEncoderOutput:
        """The FPN neck on ``emb`` (what ``Sam3VisionModel`` adds to the backbone); the
        last one is kept, so several targets on one image pay for it once."""
        if self._neck is not None and self._neck[0] is emb:
            return self._neck[1]
        assert isinstance(emb.features, torch.Tensor)
        levels, positions = self.model.vision_encoder.neck(emb.features)
        tokens = emb.features.flatten(2).transpose(1, 2)
        vision = Sam3VisionEncoderOutput(
            last_hidden_state=tokens, fpn_hidden_states=levels, fpn_position_encoding=positions
        )
        self._neck = (emb, vision)
        return vision

    def _text(self, text: str) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """Text features and attention mask of one phrase (LRU by phrase)."""
        hit = self._texts.get(text)
        if hit is not None:
            self._texts.move_to_end(text)
            return hit
        tokens = self.processor.tokenizer(
            [text],
            padding="max_length",
            max_length=SAM3_TEXT_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        self._texts[text] = (features, tokens["attention_mask"])
        while len(self._texts) > TEXT_CACHE_SIZE:
            self._texts.popitem(last=False)
        return features, tokens["attention_mask"]

    @torch.inference_mode()
    def concept(
        self,
        emb: Embedding,
        text: str,
        out_size: tuple[int, int],
        *,
        min_score: float,
        max_instances: int,
    ) -> list[Instance]:
        """Instances of ``text``: score >= ``min_score``, highest first, at most
        ``max_instances``; masks upsampled to ``out_size`` only for those kept."""
        with self.lock:
            features, mask = self._text(text)
            out = self.model(
                vision_embeds=self._vision(emb), text_embeds=features, attention_mask=mask
            )
        scores = out.pred_logits[0].float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits[0].float().sigmoid()
        scores = scores.cpu()
        order = [int(i) for i in torch.argsort(scores, descending=True, stable=True)]
        keep = [i for i in order if float(scores[i]) >= min_score][:max_instances]
        if not keep:
            return []
        low = out.pred_masks[0][keep].float()[None]  # [1, K, h, w] over the whole view
        logits = F.interpolate(low, out_size, mode="bilinear", align_corners=False)[0].cpu()
        return [
            Instance(float(scores[i]), (logits[k] > self.mask_threshold).numpy())
            for k, i in enumerate(keep)
        ]

    # --- prompt modes: not served --------------------------------------------------

    def predict_low_res(self, emb: Embedding, **kwargs: object) -> tuple[torch.Tensor, np.ndarray]:
        raise UnsupportedMode("attention", self.name)

    def upsample(
        self, emb: Embedding, low_res: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        raise UnsupportedMode("attention", self.name)

    def automatic(self, emb: Embedding, image: np.ndarray, **kwargs: object) -> list:
        raise UnsupportedMode("auto", self.name)
