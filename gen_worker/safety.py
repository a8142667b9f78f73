"""The optional image check: diffusers' ``StableDiffusionSafetyChecker`` on generated images.

It is loaded from ``GENSEG_SAFETY_CHECKER`` (a Hugging Face id or a local directory)
with the pretrained profile, and runs only when the policy's ``safety`` is ``mark`` or
``refuse`` (docs/policy.md). It answers one question per image, flagged or not; what a
flag means is the policy's business (:mod:`gen_worker.handler`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor

log = logging.getLogger(__name__)

#: The flag an image-ready event carries for an image the checker flagged.
NSFW = "nsfw"


class SafetyChecker:
    """A loaded checker and its image processor on one device."""

    def __init__(
        self,
        model: StableDiffusionSafetyChecker,
        processor: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
    ) -> None:
        self.model = model.to(device, dtype).eval()
        self.processor = processor
        self.device, self.dtype, self.source = device, dtype, source

    @classmethod
    def load(
        cls, source: str, *, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> SafetyChecker:
        """Load from an id or directory holding the checker and its
        ``preprocessor_config.json`` (the layout of CompVis/stable-diffusion-safety-checker),
        or from a Stable Diffusion pipeline directory (``safety_checker/`` and
        ``feature_extractor/`` subfolders)."""
        model_dir = processor_dir = ""
        local = Path(source).expanduser()
        if local.is_dir():
            source = str(local)
            if (local / "safety_checker").is_dir():
                model_dir, processor_dir = "safety_checker", "feature_extractor"
        log.info("loading the safety checker from %s", source)
        model = StableDiffusionSafetyChecker.from_pretrained(source, subfolder=model_dir)
        processor = CLIPImageProcessor.from_pretrained(source, subfolder=processor_dir)
        return cls(model, processor, device=device, dtype=dtype, source=source)

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        """Whether the checker flags each image (one batched forward pass)."""
        if not images:
            return []
        pixels = self.processor(list(images), return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.dtype)
        # forward_onnx makes the same per-concept threshold decision as the pipeline's
        # forward(), vectorised, and only zeroes the placeholder we hand it: the pipeline
        # would black out the images and log that it did, which is not what happens here.
        placeholder = torch.zeros(len(images), 1, device=self.device)
        with torch.inference_mode():
            _, nsfw = self.model.forward_onnx(pixels, placeholder)
        return [bool(x) for x in nsfw.tolist()]
