"""Generator model profiles: the built-in ones, the lookup of a profile by name, and
:class:`GenModels`, the pipelines of the chosen profile on one device.

Built-in profiles (:data:`BUILTIN_PROFILES`):

- ``tiny``: the real diffusers/transformers classes with tiny configurations and
  seeded random weights (the same in every process), a locally written tokenizer;
- ``random``: the SD 1.5 architectures (UNet, VAE, CLIP ViT-L/14 text encoder)
  with seeded random weights: the compute cost of the real model, no download;
- ``pretrained``: ``Settings.sd_model`` / ``sd_inpaint_model``, each a Hugging Face
  id, a local diffusers directory, or one ``.safetensors``/``.ckpt`` file.

``GENSEG_SD_ARCH`` (``sd15``, ``sdxl``) chooses the architecture of ``tiny`` and
``random``; ``pretrained`` reads it from the checkpoint (:mod:`gen_worker.checkpoints`).
SDXL models are named ``sdxl:<profile or checkpoint>`` in image-ready events; SD 1.5
names are unchanged (``tiny``, ``random-sd15``, the ``SD_MODEL`` value).

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
from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

from gen_worker import families

# The architecture names are re-exported: tests and benches import them from here.
from gen_worker.architectures import (
    SD15_SCHEDULER_CONFIG,
    WEIGHTS_SEED,
    Architecture,
    build_random_components,
    build_random_pipeline,
    build_tiny_pipeline,
    pipeline_classes,
    sd15_architecture,
    sdxl_architecture,
    tiny_architecture,
    tiny_xl_architecture,
)
from gen_worker.checkpoints import SINGLE_FILE_SUFFIXES, detect_family, load_pretrained
from gen_worker.families import Family, check_family
from gen_worker.registry import GenPipelines, GenProfile, load_plugin, plugin_names

if TYPE_CHECKING:
    from plumbing.settings import Settings

log = logging.getLogger(__name__)

#: ``image-ready.model`` prefix of SDXL models (SD 1.5 names have none, as always).
SDXL_PREFIX = "sdxl:"


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
    #: Fuse the UNet's attention projections (:func:`fuse_projections`; CUDA only).
    fuse_projections: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """Options from ``GENSEG_DEVICE``, ``GENSEG_XFORMERS``, ``GENSEG_TORCH_COMPILE``,
        ``GENSEG_BATCH_INVARIANT`` and ``SD_MODEL_CONFIG`` (see :class:`Settings`).

        ``GENSEG_TORCH_COMPILE`` (the fast path) also fuses the attention projections,
        unless xFormers is on (its processors would be replaced) or the worker takes
        LoRA adapters (``GENSEG_LORA_DIR``: they patch the unfused projections, which a
        fused UNet no longer calls)."""
        return cls(
            device=settings.device,
            batch_invariant=settings.batch_invariant,
            xformers=settings.xformers,
            compile=settings.torch_compile,
            single_file_config=settings.sd_model_config,
            fuse_projections=settings.torch_compile
            and not settings.xformers
            and settings.lora_dir is None,
        )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dtype_for(self, device: torch.device) -> torch.dtype:
        return torch.float16 if device.type == "cuda" else torch.float32


# --- the built-in profiles -----------------------------------------------------------------


def sd_arch(settings: Any) -> Family:
    """``GENSEG_SD_ARCH`` (read defensively: Settings-like objects may lack it)."""
    return check_family(getattr(settings, "sd_arch", "sd15"))


def _load_tiny(settings: Settings, options: RuntimeOptions, dtype: torch.dtype) -> GenPipelines:
    arch = tiny_xl_architecture() if sd_arch(settings) == "sdxl" else tiny_architecture()
    name = "tiny" if arch.family == "sd15" else SDXL_PREFIX + "tiny"
    return GenPipelines(
        name=name,
        txt2img=build_random_pipeline(arch),
        inpaint_name=f"{name}-inpaint",
        inpaint_loader=lambda: build_random_pipeline(arch, inpaint=True),
    )


def _load_random(settings: Settings, options: RuntimeOptions, dtype: torch.dtype) -> GenPipelines:
    arch = sdxl_architecture() if sd_arch(settings) == "sdxl" else sd15_architecture()
    name = "random-sd15" if arch.family == "sd15" else SDXL_PREFIX + "random"
    return GenPipelines(
        name=name,
        txt2img=build_random_pipeline(arch),
        inpaint_name=f"{name}-inpaint",
        inpaint_loader=lambda: build_random_pipeline(arch, inpaint=True),
    )


def _default_inpaint_model() -> str:
    from plumbing.settings import Settings

    return str(Settings.model_fields["sd_inpaint_model"].default)


def _load_pretrained(
    settings: Settings, options: RuntimeOptions, dtype: torch.dtype
) -> GenPipelines:
    """``SD_MODEL``, whose architecture is read from it. An SDXL model with
    ``SD_INPAINT_MODEL`` left at its (SD 1.5) default inpaints with its own components."""
    sd_model, inpaint_model = settings.sd_model, settings.sd_inpaint_model
    family = detect_family(sd_model)
    if family != sd_arch(settings):
        log.info("SD_MODEL %s is %s (GENSEG_SD_ARCH is for tiny and random)", sd_model, family)
    txt2img_cls, _ = pipeline_classes(family)
    txt2img = load_pretrained(
        sd_model, txt2img_cls, dtype=dtype, single_file_config=options.single_file_config
    )
    if family == "sdxl" and inpaint_model == _default_inpaint_model():
        return GenPipelines(
            name=SDXL_PREFIX + sd_model,
            txt2img=txt2img,
            inpaint_name=SDXL_PREFIX + sd_model,
            inpaint_loader=lambda: families.xl_inpaint_for(txt2img),
        )
    # An SD 1.5 worker loads its inpainting model as it always did (no detection, which
    # may download); an SDXL worker with an inpainting model of its own checks which it is.
    inpaint_family = detect_family(inpaint_model) if family == "sdxl" else "sd15"
    _, inpaint_cls = pipeline_classes(inpaint_family)
    return GenPipelines(
        name=(SDXL_PREFIX + sd_model) if family == "sdxl" else sd_model,
        txt2img=txt2img,
        inpaint_name=(SDXL_PREFIX + inpaint_model) if inpaint_family == "sdxl" else inpaint_model,
        inpaint_loader=lambda: load_pretrained(inpaint_model, inpaint_cls, dtype=dtype),
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
    #: LoRA adapters loaded into these networks, by ``id`` of the UNet they were loaded
    #: into (pipelines sharing it share them): :class:`gen_worker.lora.AdapterCache`.
    adapters: dict[int, Any] = field(default_factory=dict, repr=False)
    #: The models that draw the views of scene requests (:attr:`GenPipelines.scene`),
    #: on the same device; None: these models draw them.
    scene: GenModels | None = None
    _inpaint: StableDiffusionInpaintPipeline | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.txt2img = self._prepare(self.txt2img)
        self.img2img = families.img2img_for(self.txt2img)
        self.img2img.set_progress_bar_config(disable=True)

    @property
    def family(self) -> Family:
        """``sd15`` or ``sdxl``: the architecture of the text-to-image pipeline."""
        return families.family_of(self.txt2img)

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
            if self.options.fuse_projections:
                fuse_projections(pipe)
            if self.options.compile:
                pipe.unet = compile_unet(pipe.unet)
        return pipe

    @classmethod
    def from_settings(cls, settings: Any, options: RuntimeOptions | None = None) -> GenModels:
        """Build or load the profile ``settings.models`` (``GENSEG_MODELS``) in the
        architecture ``GENSEG_SD_ARCH`` (ValueError naming the setting if unknown)."""
        sd_arch(settings)
        profile = gen_profile(settings.models)
        opts = options or RuntimeOptions.from_settings(settings)
        device = opts.torch_device()
        dtype = opts.dtype_for(device)
        pipes = profile.load(settings, opts, dtype)

        def models(p: GenPipelines, scene: GenModels | None = None) -> GenModels:
            return cls(
                profile=profile.name,
                name=p.name,
                device=device,
                dtype=dtype,
                txt2img=p.txt2img,
                inpaint_name=p.inpaint_name,
                inpaint_loader=p.inpaint_loader,
                options=opts,
                native_size=profile.native_size,
                scene=scene,
            )

        return models(pipes, models(pipes.scene) if pipes.scene is not None else None)


def fuse_projections(pipe: Any) -> None:
    """Fuse the UNet's attention projections: one matrix product for the query, key and
    value of self-attention, one for the key and value of cross-attention, where there
    were three and two (diffusers' ``fuse_qkv_projections``, which puts its fused
    processor everywhere). Call it before the heat-map recorder goes on the
    cross-attention layers (:class:`gen_worker.generate.Generator` installs it on first
    use); the recorder computes with the fused key-value projection too."""
    pipe.unet.fuse_qkv_projections()


def compile_unet(
    unet: torch.nn.Module, backend: str | Callable[..., Any] = "inductor", fullgraph: bool = False
) -> Any:
    """``torch.compile`` the UNet, its heat-map recorder included.

    The recorder (:mod:`gen_worker.attention`) traces into the UNet's graph: what it
    keeps between layers are tensors it adds to in place, and what dynamo guards on
    (whether it records, how many samples, the latent size) holds for a whole
    request, so a request shape compiles once, on its first batch, and every step after
    reuses the graph (tests/test_compile.py, with ``fullgraph``). Not ``fullgraph``
    here: a graph break that another diffusers release brings should cost speed, not
    requests. ``backend``: tests use one that skips code generation.
    """
    return torch.compile(unet, backend=backend, fullgraph=fullgraph)


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
    "SDXL_PREFIX",
    "SINGLE_FILE_SUFFIXES",
    "WEIGHTS_SEED",
    "Architecture",
    "GenModels",
    "GenPipelines",
    "GenProfile",
    "RuntimeOptions",
    "build_random_components",
    "build_random_pipeline",
    "build_tiny_pipeline",
    "compile_unet",
    "fuse_projections",
    "gen_profile",
    "known_profiles",
    "load_pretrained",
    "sd15_architecture",
    "sd_arch",
    "sdxl_architecture",
    "tiny_architecture",
    "tiny_xl_architecture",
]
