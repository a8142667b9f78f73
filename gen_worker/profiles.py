"""Generator model profiles: the built-in ones, the lookup of a profile by name, and
:class:`GenModels`, the pipelines of the chosen profile on one device.

Built-in profiles (:data:`BUILTIN_PROFILES`):

- ``tiny``: the real diffusers/transformers classes with tiny configurations and
  seeded random weights (the same in every process), a locally written tokenizer;
- ``random``: the SD 1.5 architectures (UNet, VAE, CLIP ViT-L/14 text encoder)
  with seeded random weights: the compute cost of the real model, no download;
- ``pretrained``: ``Settings.sd_model`` / ``sd_inpaint_model``, each a Hugging Face
  id, a local diffusers directory, or one ``.safetensors``/``.ckpt`` file.

Other profiles plug in from installed packages through entry points
(:mod:`gen_worker.registry`); this worker knows none of them by name.

:class:`GenModels` holds the text-to-image pipeline, an img2img pipeline sharing its
components (progressive refinement), and the inpainting pipeline, built on first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

# The architecture names are re-exported: tests and benches import them from here.
from gen_worker.architectures import (
    SD15_SCHEDULER_CONFIG,
    WEIGHTS_SEED,
    Architecture,
    build_random_components,
    build_tiny_pipeline,
    sd15_architecture,
    tiny_architecture,
)
from gen_worker.registry import GenPipelines, GenProfile, load_plugin, plugin_names

if TYPE_CHECKING:
    from plumbing.settings import Settings

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the models run: device, precision and the GPU speed-ups.

    ``device`` ``auto`` picks CUDA when available. fp16, channels-last and the
    optional xFormers/``torch.compile`` apply on CUDA only; the CPU path stays fp32.
    """

    device: str = "auto"
    xformers: bool = False
    compile: bool = False
    channels_last: bool = True
    #: Evaluate the UNet per sample so images never depend on their batch
    #: (``GENSEG_BATCH_INVARIANT``); None: on the CPU only.
    batch_invariant: bool | None = None
    #: ``SD_MODEL_CONFIG``: a diffusers config (directory or id) for single-file checkpoints.
    single_file_config: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """Options from ``GENSEG_DEVICE``, ``GENSEG_XFORMERS``, ``GENSEG_TORCH_COMPILE``,
        ``GENSEG_BATCH_INVARIANT`` and ``SD_MODEL_CONFIG`` (see :class:`Settings`)."""
        return cls(
            device=settings.device,
            batch_invariant=settings.batch_invariant,
            xformers=settings.xformers,
            compile=settings.torch_compile,
            single_file_config=settings.sd_model_config,
        )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dtype_for(self, device: torch.device) -> torch.dtype:
        return torch.float16 if device.type == "cuda" else torch.float32


def load_pretrained(
    source: str,
    cls: type[StableDiffusionPipeline] | type[StableDiffusionInpaintPipeline],
    *,
    dtype: torch.dtype = torch.float32,
    single_file_config: str | None = None,
) -> Any:
    """Load ``cls`` from a Hugging Face id, a local diffusers directory or a single file.

    The safety checker is not loaded: the pipeline's images go to segmentation, and
    a checker (if wanted) belongs in its own stage.
    """
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if source.lower().endswith(SINGLE_FILE_SUFFIXES) and Path(source).expanduser().is_file():
        kwargs: dict[str, Any] = {"dtype": dtype, **extra}
        if single_file_config:
            kwargs["config"] = single_file_config
        log.info("loading %s from single file %s", cls.__name__, source)
        return cls.from_single_file(str(Path(source).expanduser()), **kwargs)
    log.info("loading %s from %s", cls.__name__, source)
    return cls.from_pretrained(source, dtype=dtype, **extra)


# --- the built-in profiles -----------------------------------------------------------------


def _load_tiny(settings: Settings, options: RuntimeOptions, dtype: torch.dtype) -> GenPipelines:
    return GenPipelines(
        name="tiny",
        txt2img=build_tiny_pipeline(),
        inpaint_name="tiny-inpaint",
        inpaint_loader=lambda: build_tiny_pipeline(inpaint=True),
    )


def _load_random(settings: Settings, options: RuntimeOptions, dtype: torch.dtype) -> GenPipelines:
    arch = sd15_architecture()
    return GenPipelines(
        name="random-sd15",
        txt2img=StableDiffusionPipeline(**build_random_components(arch)),
        inpaint_name="random-sd15-inpaint",
        inpaint_loader=lambda: StableDiffusionInpaintPipeline(
            **build_random_components(arch, inpaint=True)
        ),
    )


def _load_pretrained(
    settings: Settings, options: RuntimeOptions, dtype: torch.dtype
) -> GenPipelines:
    sd_model, inpaint_model = settings.sd_model, settings.sd_inpaint_model
    return GenPipelines(
        name=sd_model,
        txt2img=load_pretrained(
            sd_model,
            StableDiffusionPipeline,
            dtype=dtype,
            single_file_config=options.single_file_config,
        ),
        inpaint_name=inpaint_model,
        inpaint_loader=lambda: load_pretrained(
            inpaint_model, StableDiffusionInpaintPipeline, dtype=dtype
        ),
    )


BUILTIN_PROFILES: dict[str, GenProfile] = {
    p.name: p
    for p in (
        GenProfile("tiny", _load_tiny),
        GenProfile("random", _load_random),
        GenProfile("pretrained", _load_pretrained),
    )
}


def known_profiles() -> list[str]:
    """The built-in profiles, then those installed packages declare."""
    plugins = [name for name in plugin_names() if name not in BUILTIN_PROFILES]
    return [*BUILTIN_PROFILES, *plugins]


def gen_profile(name: str) -> GenProfile:
    """The profile ``name``: a built-in one, else an installed plug-in.

    Raises ValueError naming every known profile when there is none of that name.
    """
    if name in BUILTIN_PROFILES:  # built-ins win: a plug-in cannot replace one
        return BUILTIN_PROFILES[name]
    profile = load_plugin(name)
    if profile is None:
        raise ValueError(
            f"unknown model profile {name!r}: expected one of {', '.join(known_profiles())}"
        )
    return profile


@dataclass
class GenModels:
    """The pipelines of one profile on one device.

    ``txt2img`` and ``img2img`` share every component; ``inpaint`` is built on first
    use (the pretrained inpainting model is a second multi-GB download).
    """

    profile: str
    name: str
    device: torch.device
    dtype: torch.dtype
    txt2img: StableDiffusionPipeline
    inpaint_name: str
    inpaint_loader: Callable[[], StableDiffusionInpaintPipeline]
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    #: ``(width, height)`` pixels the profile's models draw only (see
    #: :attr:`GenProfile.native_size`); None: any size.
    native_size: tuple[int, int] | None = None
    _inpaint: StableDiffusionInpaintPipeline | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.txt2img = self._prepare(self.txt2img)
        components = {**self.txt2img.components, "requires_safety_checker": False}
        self.img2img = StableDiffusionImg2ImgPipeline(**components)
        self.img2img.set_progress_bar_config(disable=True)

    @property
    def scheduler_config(self) -> Any:
        """The base noise schedule every sampler is built from."""
        return self.txt2img.scheduler.config

    @property
    def inpaint(self) -> StableDiffusionInpaintPipeline:
        with self._lock:
            if self._inpaint is None:
                self._inpaint = self._prepare(self.inpaint_loader())
            return self._inpaint

    def _prepare(self, pipe: Any) -> Any:
        """Move to the device and apply the GPU options (fp16, channels-last, xFormers, compile)."""
        # Only cast when needed: diffusers warns on a dtype cast, even a no-op one.
        if pipe.unet.dtype != self.dtype:
            pipe = pipe.to(self.device, self.dtype)
        else:
            pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            if self.options.channels_last:
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            if self.options.xformers:
                enable_xformers(pipe)
            if self.options.compile:
                # The heat-map processor keeps Python-side state: compile without fullgraph.
                pipe.unet = torch.compile(pipe.unet)
        return pipe

    @classmethod
    def from_settings(cls, settings: Any, options: RuntimeOptions | None = None) -> GenModels:
        """Build or load the profile ``settings.models`` (``GENSEG_MODELS``)."""
        profile = gen_profile(settings.models)
        opts = options or RuntimeOptions.from_settings(settings)
        device = opts.torch_device()
        dtype = opts.dtype_for(device)
        pipes = profile.load(settings, opts, dtype)
        return cls(
            profile=profile.name,
            name=pipes.name,
            device=device,
            dtype=dtype,
            txt2img=pipes.txt2img,
            inpaint_name=pipes.inpaint_name,
            inpaint_loader=pipes.inpaint_loader,
            options=opts,
            native_size=profile.native_size,
        )


def enable_xformers(pipe: Any) -> bool:
    """Use xFormers attention when it is installed; False (and SDPA stays) otherwise."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        log.warning("GENSEG_XFORMERS asked for xFormers, which is not installed: using SDPA")
        return False
    pipe.enable_xformers_memory_efficient_attention()
    return True


__all__ = [
    "BUILTIN_PROFILES",
    "SD15_SCHEDULER_CONFIG",
    "WEIGHTS_SEED",
    "Architecture",
    "GenModels",
    "GenPipelines",
    "GenProfile",
    "RuntimeOptions",
    "build_random_components",
    "build_tiny_pipeline",
    "gen_profile",
    "known_profiles",
    "load_pretrained",
    "sd15_architecture",
    "tiny_architecture",
]
