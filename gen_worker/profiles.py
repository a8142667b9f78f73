"""Model profiles: building or loading the Stable Diffusion pipelines a gen worker runs.

- ``tiny``: the real diffusers/transformers classes with tiny configurations and
  seeded random weights (the same in every process), a locally written tokenizer;
- ``random``: the SD 1.5 architectures (UNet, VAE, CLIP ViT-L/14 text encoder)
  with seeded random weights: the compute cost of the real model, no download;
- ``toy``: the small pipeline trained on the synthetic world of :mod:`toy.world`
  (``python -m toy.train_gen``), shipped in ``toy/weights/sd`` (or ``TOY_SD_MODEL``),
  loaded exactly like ``pretrained``; 64x64 images, and inpainting with the same
  UNet (diffusers blends the kept region in at every step);
- ``pretrained``: ``Settings.sd_model`` / ``sd_inpaint_model``, each a Hugging Face
  id, a local diffusers directory, or one ``.safetensors``/``.ckpt`` file.

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
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gen_worker.tokenizer import local_clip_tokenizer

if TYPE_CHECKING:
    from plumbing.settings import Settings

log = logging.getLogger(__name__)

#: Seed of the random weights of the ``tiny`` and ``random`` profiles. Fixed so that every
#: process builds the same model, hence the same image for the same request.
WEIGHTS_SEED = 20240229

SD15_VOCAB_SIZE = 49408

#: The SD 1.5 noise schedule (its scheduler_config.json); samplers are built from it.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

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


# --- architectures ----------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Configurations of one profile's networks (diffusers/transformers config kwargs)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer_vocab_size: int | None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER_CONFIG))


def tiny_architecture() -> Architecture:
    """A few-MB SD-shaped model: VAE factor 8, cross-attention at two UNet resolutions."""
    return Architecture(
        unet={
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 32,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (8, 16, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
        },
        tokenizer_vocab_size=None,
    )


def sd15_architecture() -> Architecture:
    """Stable Diffusion 1.5: UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M."""
    return Architecture(
        unet={
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "sample_size": 512,
        },
        text_encoder={
            "vocab_size": SD15_VOCAB_SIZE,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        tokenizer_vocab_size=SD15_VOCAB_SIZE,
    )


def build_random_components(
    arch: Architecture, *, inpaint: bool = False, seed: int = WEIGHTS_SEED
) -> dict[str, Any]:
    """Pipeline components with seeded random weights (fp32, CPU).

    The global RNG is forked, so building models never disturbs the caller's random
    state, and the weights depend on ``seed`` only (identical in every process).
    ``inpaint``: a UNet with 9 input channels (latents + mask + masked-image latents).
    """
    tokenizer = local_clip_tokenizer(arch.tokenizer_vocab_size)
    text_cfg = dict(arch.text_encoder)
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet_cfg = dict(arch.unet)
    if inpaint:
        unet_cfg["in_channels"] = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**arch.vae)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler.from_config(arch.scheduler),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_tiny_pipeline(*, inpaint: bool = False) -> StableDiffusionPipeline:
    """The ``tiny`` text-to-image (or inpainting) pipeline, fp32 on the CPU."""
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(**build_random_components(tiny_architecture(), inpaint=inpaint))


# --- loading -------------------------------------------------------------------------------


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
        opts = options or RuntimeOptions.from_settings(settings)
        device = opts.torch_device()
        dtype = opts.dtype_for(device)
        profile = settings.models
        if profile == "tiny":
            return cls(
                profile="tiny",
                name="tiny",
                device=device,
                dtype=dtype,
                txt2img=build_tiny_pipeline(),
                inpaint_name="tiny-inpaint",
                inpaint_loader=lambda: build_tiny_pipeline(inpaint=True),
                options=opts,
            )
        if profile == "random":
            arch = sd15_architecture()
            return cls(
                profile="random",
                name="random-sd15",
                device=device,
                dtype=dtype,
                txt2img=StableDiffusionPipeline(**build_random_components(arch)),
                inpaint_name="random-sd15-inpaint",
                inpaint_loader=lambda: StableDiffusionInpaintPipeline(
                    **build_random_components(arch, inpaint=True)
                ),
                options=opts,
            )
        if profile == "toy":
            from toy.weights import SD_DIR

            source = settings.toy_sd_model or str(SD_DIR)
            txt2img = load_pretrained(source, StableDiffusionPipeline, dtype=dtype)
            return cls(
                profile="toy",
                name=source,
                device=device,
                dtype=dtype,
                txt2img=txt2img,
                inpaint_name=source,
                inpaint_loader=lambda: StableDiffusionInpaintPipeline(
                    **{**txt2img.components, "requires_safety_checker": False}
                ),
                options=opts,
            )
        if profile == "pretrained":
            sd_model, inpaint_model = settings.sd_model, settings.sd_inpaint_model
            return cls(
                profile="pretrained",
                name=sd_model,
                device=device,
                dtype=dtype,
                txt2img=load_pretrained(
                    sd_model,
                    StableDiffusionPipeline,
                    dtype=dtype,
                    single_file_config=opts.single_file_config,
                ),
                inpaint_name=inpaint_model,
                inpaint_loader=lambda: load_pretrained(
                    inpaint_model, StableDiffusionInpaintPipeline, dtype=dtype
                ),
                options=opts,
            )
        raise ValueError(
            f"unknown model profile {profile!r}: expected tiny, toy, random or pretrained"
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
    "SD15_SCHEDULER_CONFIG",
    "WEIGHTS_SEED",
    "Architecture",
    "CLIPTokenizer",
    "GenModels",
    "RuntimeOptions",
    "build_random_components",
    "build_tiny_pipeline",
    "load_pretrained",
    "sd15_architecture",
    "tiny_architecture",
]
