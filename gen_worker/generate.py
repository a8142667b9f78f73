"""Pure generation: a batch of compatible samples -> PIL images and target heat maps.

No Kafka, no blob store: :mod:`gen_worker.handler` maps events to :class:`Sample` s
and results to events. One :class:`Generator` runs one batch at a time (a lock),
because schedulers and the heat-map accumulator are per-pipeline state.

Determinism: every sample has its own ``torch.Generator`` seeded with its seed (CPU
generators, so the initial noise is the same on every device), the VAE runs one
sample at a time, and on the CPU the UNet too (see
:func:`gen_worker.attention.batch_invariant_unet`). So on the CPU an image depends
only on its request, the model, the thread count and the library versions, never
on the batch it was generated in.

The architecture's differences (SD 1.5, SDXL) are in :mod:`gen_worker.families`; LoRA
adapters (:attr:`BatchSpec.loras`) are loaded and activated per batch through
:mod:`gen_worker.lora`, outside inference mode (peft creates parameters).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from gen_worker import families
from gen_worker.attention import (
    HeatmapAccumulator,
    batch_invariant_unet,
    find_token_span,
    install_recorder,
    target_heatmap,
)
from gen_worker.lora import DEFAULT_CACHE_SIZE, AdapterCache, AdapterSet, LoraLibrary
from gen_worker.oom import low_memory_mode
from gen_worker.profiles import GenModels
from gen_worker.samplers import make_scheduler

log = logging.getLogger(__name__)

Mode = Literal["txt2img", "inpaint"]
#: ``on_step(done, total)``: denoising steps done so far of ``total``, over all passes.
StepCallback = Callable[[int, int], None]
#: ``phase(name)``: a context manager timing one phase (``StageContext.phase`` fits).
PhaseFactory = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class BatchSpec:
    """What every sample of one batch shares (the stage's batch key).

    ``strength``: how much of the input an inpaint pass regenerates (1.0 = all).
    ``progressive``: ``(draft_scale, strength)`` of draft-upscale-refine, or None.
    ``loras``: the LoRA adapters ``(name, scale)`` in name order (:func:`lora.adapter_set`).
    ``scene``: views of multi-view scene requests (the gen stage draws them with the
    profile's scene models, when it has them; :class:`Generator` does not read it).
    """

    mode: Mode
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    strength: float = 1.0
    progressive: tuple[float, float] | None = None
    loras: AdapterSet = ()
    scene: bool = False


@dataclass(frozen=True)
class Sample:
    """One image to generate. ``image``/``mask`` (inpaint): RGB and L, ``width x height``."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    targets: tuple[str, ...] = ()
    image: Image.Image | None = None
    mask: Image.Image | None = None


@dataclass
class SampleResult:
    """A generated image and, per target found in the prompt, its raw heat map.

    ``heatmaps[target]``: float32 ``[height / f, width / f]`` (``f`` the VAE factor,
    8), the mean attention probability of the target's tokens (not normalised).
    """

    image: Image.Image
    seed: int
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    missing_targets: list[str] = field(default_factory=list)


def draft_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The progressive draft's size: ``scale`` times the request, multiples of 8, >= 64."""

    def one(n: int) -> int:
        return min(n, max(64, round(n * scale / 8) * 8))

    return one(width), one(height)


def effective_steps(steps: int, strength: float) -> int:
    """``num_inference_steps`` for an img2img/inpaint pass that runs at least one step.

    diffusers runs ``int(steps * strength)`` steps and refuses zero.
    """
    if int(steps * strength) >= 1:
        return steps
    return math.ceil(1.0 / strength)


def _no_phase(name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


class Generator:
    """Runs batches of :class:`Sample` s on a :class:`GenModels`.

    ``batch_invariant``: evaluate the UNet per sample so an image never depends on its
    batch (default: ``models.options.batch_invariant``, else on the CPU only, where
    byte-identical images are promised).
    ``loras``: where adapter names are found (None: this generator applies none);
    ``lora_cache_size``: adapters kept loaded per pipeline (at least ``loras``' limit), for
    the first generator that loads one into these models.
    """

    def __init__(
        self,
        models: GenModels,
        *,
        batch_invariant: bool | None = None,
        loras: LoraLibrary | None = None,
        lora_cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.models = models
        self.loras = loras
        self.lora_cache_size = lora_cache_size
        if batch_invariant is None:
            batch_invariant = models.options.batch_invariant
        if batch_invariant is None:
            batch_invariant = models.device.type == "cpu"
        self.batch_invariant = batch_invariant
        self.accumulator = HeatmapAccumulator()
        self._instrumented: set[int] = set()
        self._lock = threading.Lock()

    def generate(
        self,
        spec: BatchSpec,
        samples: Sequence[Sample],
        *,
        on_step: StepCallback | None = None,
        phase: PhaseFactory | None = None,
        low_memory: bool = False,
    ) -> list[SampleResult]:
        """Generate one image per sample, in order; raises on failure (OOM included)."""
        if not samples:
            return []
        phase = phase or _no_phase
        with self._lock:
            pipe = self._pipeline(spec.mode)
            with phase("lora") if spec.loras else contextlib.nullcontext():
                self._apply_loras(pipe, spec.loras)
            with torch.inference_mode():
                return self._generate(pipe, spec, list(samples), on_step, phase, low_memory)

    def adapters(self, mode: Mode = "txt2img") -> AdapterCache | None:
        """The LoRA adapters loaded into the pipeline of ``mode`` (None: none ever)."""
        pipe = self.models.inpaint if mode == "inpaint" else self.models.txt2img
        return self.models.adapters.get(id(pipe.unet))

    # --- internals -------------------------------------------------------------------

    def _pipeline(self, mode: Mode) -> Any:
        pipe = self.models.inpaint if mode == "inpaint" else self.models.txt2img
        if id(pipe.unet) not in self._instrumented:
            install_recorder(pipe.unet, self.accumulator)
            self._instrumented.add(id(pipe.unet))
        return pipe

    def _apply_loras(self, pipe: Any, loras: AdapterSet) -> None:
        """Activate the batch's adapters on ``pipe`` (or disable all of them). The loaded
        adapters belong to the models (generators sharing models share them)."""
        cache = self.models.adapters.get(id(pipe.unet))
        if not loras:
            if cache is not None:
                cache.apply(pipe, [])
            return
        library = self.loras or LoraLibrary(None)
        files = [(library.resolve(name), scale) for name, scale in loras]
        if cache is None:
            capacity = max(self.lora_cache_size, library.max_per_request)
            cache = AdapterCache(capacity, families.family_of(pipe))
            self.models.adapters[id(pipe.unet)] = cache
        cache.apply(pipe, files)

    def _generate(
        self,
        pipe: Any,
        spec: BatchSpec,
        samples: list[Sample],
        on_step: StepCallback | None,
        phase: PhaseFactory,
        low_memory: bool,
    ) -> list[SampleResult]:
        device = self.models.device
        cfg = spec.guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        factor = pipe.vae_scale_factor
        latent_hw = (spec.height // factor, spec.width // factor)
        generators = [torch.Generator(device="cpu").manual_seed(s.seed) for s in samples]

        with phase("text_encode"):
            conditioning = families.encode(
                pipe,
                [s.prompt for s in samples],
                [s.negative_prompt for s in samples],
                cfg,
                device,
                per_prompt=self.batch_invariant,
            )
            spans = self._token_spans(families.span_tokenizer(pipe), samples)
        record = any(positions for per_sample in spans for positions in per_sample.values())

        acc = self.accumulator
        acc.samples = list(range(len(samples)))
        if record:
            tokens = conditioning["prompt_embeds"].shape[1]  # type: ignore[union-attr]
            acc.start(len(samples), tokens, latent_hw, device)
        progress = _Progress(on_step, self._total_steps(spec))
        try:
            with (
                phase("denoise"),
                batch_invariant_unet(pipe.unet, acc, enabled=self.batch_invariant),
                low_memory_mode(pipe, enabled=low_memory),
            ):
                common = {
                    **conditioning,
                    "guidance_scale": spec.guidance_scale,
                    "generator": generators,
                    "output_type": "latent",
                    "return_dict": False,
                }
                if spec.mode == "inpaint":
                    latents = self._inpaint(pipe, spec, samples, cfg, latent_hw, progress, common)
                elif spec.progressive is not None:
                    latents = self._progressive(pipe, spec, cfg, progress, common)
                else:
                    acc.begin_pass(latent_hw, cfg)
                    pipe.scheduler = make_scheduler(spec.sampler, self.models.scheduler_config)
                    latents = pipe(
                        height=spec.height,
                        width=spec.width,
                        num_inference_steps=spec.steps,
                        callback_on_step_end=progress.callback(0),
                        **common,
                    )[0]
            maps = acc.stop() if record else None
        finally:
            acc.active = False
            acc.samples = []

        with phase("decode"), low_memory_mode(pipe, enabled=low_memory, unet=False):
            images = families.decode(pipe, latents)

        results = []
        for i, (sample, image) in enumerate(zip(samples, images, strict=True)):
            heatmaps: dict[str, np.ndarray] = {}
            missing: list[str] = []
            for target in dict.fromkeys(sample.targets):
                positions = spans[i].get(target, [])
                if positions and maps is not None:
                    heatmaps[target] = target_heatmap(maps[i], positions)
                else:
                    missing.append(target)
            results.append(SampleResult(image, sample.seed, heatmaps, missing))
        return results

    @staticmethod
    def _token_spans(tokenizer: Any, samples: list[Sample]) -> list[dict[str, list[int]]]:
        """Per sample, target -> its token positions in the prompt as the model sees it."""
        out: list[dict[str, list[int]]] = []
        for s in samples:
            if not s.targets:
                out.append({})
                continue
            ids = tokenizer(
                s.prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
            ).input_ids
            out.append({t: find_token_span(tokenizer, ids, t) for t in dict.fromkeys(s.targets)})
        return out

    @staticmethod
    def _total_steps(spec: BatchSpec) -> int:
        if spec.mode == "inpaint":
            return int(effective_steps(spec.steps, spec.strength) * spec.strength)
        if spec.progressive is not None:
            strength = spec.progressive[1]
            return spec.steps + int(effective_steps(spec.steps, strength) * strength)
        return spec.steps

    def _inpaint(
        self,
        pipe: Any,
        spec: BatchSpec,
        samples: list[Sample],
        cfg: bool,
        latent_hw: tuple[int, int],
        progress: _Progress,
        common: dict[str, Any],
    ) -> torch.Tensor:
        self.accumulator.begin_pass(latent_hw, cfg)
        pipe.scheduler = make_scheduler(spec.sampler, pipe.scheduler.config)
        return pipe(
            image=[s.image for s in samples],
            mask_image=[s.mask for s in samples],
            height=spec.height,
            width=spec.width,
            strength=spec.strength,
            num_inference_steps=effective_steps(spec.steps, spec.strength),
            callback_on_step_end=progress.callback(0),
            **common,
        )[0]

    def _progressive(
        self,
        pipe: Any,
        spec: BatchSpec,
        cfg: bool,
        progress: _Progress,
        common: dict[str, Any],
    ) -> torch.Tensor:
        """Draft at ``draft_scale``, upscale with Lanczos, refine with img2img."""
        assert spec.progressive is not None
        scale, strength = spec.progressive
        factor = pipe.vae_scale_factor
        dw, dh = draft_size(spec.width, spec.height, scale)
        self.accumulator.begin_pass((dh // factor, dw // factor), cfg)
        pipe.scheduler = make_scheduler(spec.sampler, self.models.scheduler_config)
        draft = pipe(
            height=dh,
            width=dw,
            num_inference_steps=spec.steps,
            callback_on_step_end=progress.callback(0),
            **common,
        )[0]
        upscaled = [
            im.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
            for im in families.decode(pipe, draft)
        ]
        refine = self.models.img2img
        refine.scheduler = make_scheduler(spec.sampler, self.models.scheduler_config)
        self.accumulator.begin_pass((spec.height // factor, spec.width // factor), cfg)
        return refine(
            image=upscaled,
            strength=strength,
            num_inference_steps=effective_steps(spec.steps, strength),
            callback_on_step_end=progress.callback(spec.steps),
            **common,
        )[0]


class _Progress:
    """Counts denoising steps over passes for ``on_step``; a diffusers step-end callback."""

    def __init__(self, on_step: StepCallback | None, total: int) -> None:
        self.on_step = on_step
        self.total = max(total, 1)

    def callback(self, offset: int) -> Callable[..., dict[str, Any]] | None:
        if self.on_step is None:
            return None
        on_step = self.on_step

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(min(offset + step + 1, self.total), self.total)
            return kwargs

        return step_end
