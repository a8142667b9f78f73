"""SDXL in the generator (GENSEG_SD_ARCH=sdxl): the tiny and full-size architectures, the
stage's events, heat maps over both text encoders, determinism, inpainting, progressive
generation, the pretrained path (a saved directory; single-file detection)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from consumers.stage import Output, StageContext
from gen_worker import families
from gen_worker.architectures import build_tiny_pipeline, build_tiny_xl_pipeline, sdxl_architecture
from gen_worker.attention import find_token_span
from gen_worker.checkpoints import detect_family
from gen_worker.generate import BatchSpec, Generator, Sample
from gen_worker.handler import GenStage
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.blobstore import LocalBlobStore
from plumbing.images import decode_heatmap, decode_image, encode_png
from plumbing.settings import Settings
from schemas import ImageReadyEvent, InpaintEvent, ProgressEvent, PromptEvent, Topics, parse_event

TOPICS = Topics("t")
ROOT = Path(__file__).resolve().parents[1]
SPEC = BatchSpec(
    mode="txt2img", width=64, height=64, steps=3, guidance_scale=7.5, sampler="dpmpp_2m"
)


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Iterator[None]:
    """Two threads at most: other suites share this machine's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def xl_settings(**kw: Any) -> Settings:
    return Settings(models="tiny", sd_arch="sdxl", **kw)


@pytest.fixture(scope="module")
def models() -> GenModels:
    return GenModels.from_settings(xl_settings(), RuntimeOptions(device="cpu"))


@pytest.fixture
def stage(models: GenModels) -> GenStage:
    return GenStage(xl_settings(), models=models)


class Recorder:
    def __init__(self) -> None:
        self.emitted: list[tuple[Output, int | None]] = []

    def __call__(self, output: Output, item: int | None) -> None:
        self.emitted.append((output, item))


@pytest.fixture
def emitted() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(tmp_path: Path, emitted: Recorder) -> StageContext:
    return StageContext(
        blob=LocalBlobStore(tmp_path / "blobs"), topics=TOPICS, settings=xl_settings(), emit=emitted
    )


def prompt(id: str = "x1", **kw: Any) -> PromptEvent:
    base: dict[str, Any] = {
        "prompt": "a coffee cup on a wooden table",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 7,
    }
    return PromptEvent(id=id, **{**base, **kw})


def ready_events(result: Any) -> list[ImageReadyEvent]:
    if isinstance(result, BaseException):
        raise result
    return [parse_event(o.event.to_json_bytes(), ImageReadyEvent) for o in result]


def png_sha(models: GenModels, spec: BatchSpec = SPEC, **sample: Any) -> str:
    kw = {"prompt": "a coffee cup", "seed": 11, **sample}
    [result] = Generator(models).generate(spec, [Sample(**kw)])
    return hashlib.sha256(encode_png(result.image)).hexdigest()


# --- architectures -------------------------------------------------------------------------


def test_tiny_sdxl_has_sdxl_shape_and_seeded_weights() -> None:
    a, b = build_tiny_xl_pipeline(), build_tiny_xl_pipeline()
    assert isinstance(a, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    unet = a.unet.config
    assert unet.addition_embed_type == "text_time"
    # The context is both encoders' features side by side.
    hidden = a.text_encoder.config.hidden_size + a.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    assert isinstance(a.text_encoder_2, CLIPTextModelWithProjection)
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + a.text_encoder_2.config.projection_dim
    )
    assert a.tokenizer_2.pad_token == "!" and a.tokenizer.pad_token != "!"
    assert build_tiny_xl_pipeline(inpaint=True).unet.config.in_channels == 9


def test_random_sdxl_is_full_size() -> None:
    """The ``random`` SDXL profile has SDXL base 1.0's parameter counts (meta device)."""
    arch = sdxl_architecture()
    assert arch.family == "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert (count(unet), count(vae), count(text), count(text_2)) == (
        2_567_463_684,
        83_653_863,
        123_060_480,
        694_659_840,
    )


@pytest.mark.parametrize(
    "text",
    [
        "a coffee cup on a table",
        "A Coffee Cup",
        "a zebra near a zebra",
        "a cup" + " and a cup" * 40,
    ],
)
def test_both_tokenizers_give_the_same_token_positions(models: GenModels, text: str) -> None:
    """SDXL concatenates the two encoders' states per token: one sequence, so a target's
    positions are the same whichever tokenizer finds them."""
    pipe = models.txt2img
    ids = [
        tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    ]
    end = ids[0].index(pipe.tokenizer.eos_token_id)
    assert ids[0][: end + 1] == ids[1][: end + 1]  # they differ only in the padding
    assert ids[0][end + 1 :] != ids[1][end + 1 :] or end == 76
    for target in ("cup", "coffee cup", "zebra", "table"):
        assert find_token_span(pipe.tokenizer, ids[0], target) == find_token_span(
            pipe.tokenizer_2, ids[1], target
        )


def test_unknown_architecture_stops_the_worker() -> None:
    with pytest.raises(ValidationError, match="sd15"):
        Settings(sd_arch="sdxl-turbo")

    class Loose:  # a settings object that skipped validation
        models = "tiny"
        sd_arch = "sd3"

    with pytest.raises(ValueError, match="GENSEG_SD_ARCH='sd3'") as info:
        GenModels.from_settings(Loose(), RuntimeOptions(device="cpu"))
    assert "\n" not in str(info.value)


# --- the stage's events ------------------------------------------------------------------


def test_sdxl_image_ready_events_follow_the_contract(
    stage: GenStage, ctx: StageContext, emitted: Recorder
) -> None:
    event = prompt(width=64, height=96, num_images=2, seed=41, targets=["coffee cup", "zebra"])
    [result] = stage.handle([event], ctx)
    events = ready_events(result)
    assert [e.image_index for e in events] == [0, 1]
    for k, e in enumerate(events):
        assert e.model == "sdxl:tiny" and e.params.seed == 41 + k
        assert e.params.loras is None
        assert e.missing_targets == ["zebra"] and set(e.heatmaps) == {"coffee cup"}
        image = decode_image(ctx.blob.get(e.image), max_pixels=10**6)
        assert image.size == (64, 96)
        heat = decode_heatmap(ctx.blob.get(e.heatmaps["coffee cup"]))
        assert heat.shape == (12, 8) and heat.min() == 0.0 and heat.max() == 1.0
    assert events[0].image.sha256 != events[1].image.sha256
    progress = [o.event for o, _ in emitted.emitted]
    assert progress and all(isinstance(p, ProgressEvent) for p in progress)
    assert (progress[-1].step, progress[-1].steps) == (3, 3)


def test_sdxl_same_request_is_byte_identical_alone_and_in_a_batch(
    stage: GenStage, ctx: StageContext
) -> None:
    request = prompt(id="same", targets=["cup"], num_images=2)
    alone = ready_events(stage.handle([request], ctx)[0])
    others = [
        prompt(id="o1", prompt="a red dog", seed=3, negative_prompt="blurry"),
        prompt(id="o2", prompt="a cup", seed=7, num_images=2, targets=["cup"]),
    ]
    results = stage.handle([others[0], request, others[1]], ctx)
    batched = ready_events(results[1])
    for a, b in zip(alone, batched, strict=True):
        assert a.image == b.image and a.heatmaps == b.heatmaps
    assert ready_events(results[2])[0].image.sha256 != alone[0].image.sha256


def test_sdxl_negative_prompt_and_recording_change_what_they_should(
    stage: GenStage, ctx: StageContext
) -> None:
    [plain] = ready_events(stage.handle([prompt()], ctx)[0])
    [recorded] = ready_events(stage.handle([prompt(targets=["coffee cup"])], ctx)[0])
    [negative] = ready_events(stage.handle([prompt(negative_prompt="blurry")], ctx)[0])
    [empty] = ready_events(stage.handle([prompt(negative_prompt="")], ctx)[0])
    assert recorded.heatmaps and recorded.image.sha256 == plain.image.sha256
    assert negative.image.sha256 != plain.image.sha256
    # SDXL base: no negative prompt = zero embeddings, not the encoded empty prompt.
    assert empty.image.sha256 != plain.image.sha256


def test_sdxl_heatmap_follows_the_target_tokens(models: GenModels) -> None:
    """Each target's map is its own tokens' map: different words, different maps."""
    spec = BatchSpec(
        mode="txt2img", width=64, height=64, steps=2, guidance_scale=7.5, sampler="ddim"
    )
    sample = Sample(prompt="a red dog and a blue car", seed=3, targets=("dog", "car", "red dog"))
    [r] = Generator(models).generate(spec, [sample])
    assert set(r.heatmaps) == {"dog", "car", "red dog"}
    assert not np.allclose(r.heatmaps["dog"], r.heatmaps["car"])
    assert r.heatmaps["dog"].shape == (8, 8) and np.isfinite(r.heatmaps["dog"]).all()


def test_sdxl_inpainting_and_progressive(stage: GenStage, ctx: StageContext) -> None:
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    event = InpaintEvent(
        id="in1",
        prompt="a red apple",
        width=64,
        height=64,
        steps=3,
        seed=5,
        strength=0.75,
        targets=["apple"],
        image=ctx.blob.put("in/image.png", encode_png(pixels), "image/png"),
        mask=ctx.blob.put("in/mask.png", encode_png(mask), "image/png"),
    )
    [e] = ready_events(stage.handle([event], ctx)[0])
    assert e.model == "sdxl:tiny-inpaint" and e.params.mode == "inpaint"
    assert set(e.heatmaps) == {"apple"}
    assert stage.models.inpaint.unet.config.in_channels == 9

    progressive = prompt(
        id="p1",
        width=128,
        height=96,
        steps=4,
        targets=["cup"],
        progressive={"draft_scale": 0.5, "strength": 0.5},
    )
    [p] = ready_events(stage.handle([progressive], ctx)[0])
    assert decode_image(ctx.blob.get(p.image), max_pixels=10**6).size == (128, 96)
    assert decode_heatmap(ctx.blob.get(p.heatmaps["cup"])).shape == (12, 16)


def test_sdxl_low_memory_mode_keeps_the_image_and_restores_the_processors(
    models: GenModels,
) -> None:
    sample = [Sample(prompt="a coffee cup", seed=11, targets=("cup",))]
    generator = Generator(models)
    [normal] = generator.generate(SPEC, sample)
    [low] = generator.generate(SPEC, sample, low_memory=True)
    assert set(low.heatmaps) == {"cup"}
    # Sliced attention computes the same thing in pieces: equal up to rounding.
    diff = np.abs(np.asarray(normal.image, np.int16) - np.asarray(low.image, np.int16))
    assert diff.max() <= 2
    kinds = {type(p).__name__ for p in models.txt2img.unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0", "CrossAttentionRecorder"}
    assert not models.txt2img.vae.use_tiling


def test_sdxl_vae_decodes_in_float32_when_the_model_runs_in_float16() -> None:
    """SDXL's VAE overflows in float16 (``force_upcast``): decoded in float32, then cast
    back so the next pipeline call finds it as it was. (The CPU runs float16 too.)"""
    pipe = build_tiny_xl_pipeline()
    pipe.vae.register_to_config(force_upcast=True)
    pipe = pipe.to(torch.float16)
    seen: list[torch.dtype] = []
    decode = pipe.vae.decode

    def spy(z: torch.Tensor, **kw: Any) -> Any:
        seen.append(next(pipe.vae.parameters()).dtype)
        return decode(z, **kw)

    pipe.vae.decode = spy
    with torch.inference_mode():
        images = families.decode(pipe, torch.randn(2, 4, 8, 8, dtype=torch.float16))
    assert [im.size for im in images] == [(64, 64)] * 2
    assert seen == [torch.float32, torch.float32] and pipe.vae.dtype == torch.float16


def test_sdxl_images_are_identical_in_another_process(models: GenModels) -> None:
    script = textwrap.dedent(
        f"""
        import hashlib, sys, torch
        torch.set_num_threads({torch.get_num_threads()})
        from gen_worker.generate import BatchSpec, Generator, Sample
        from gen_worker.profiles import GenModels, RuntimeOptions
        from plumbing.images import encode_png
        from plumbing.settings import Settings
        models = GenModels.from_settings(
            Settings(models="tiny", sd_arch="sdxl"), RuntimeOptions(device="cpu")
        )
        spec = BatchSpec(mode="txt2img", width=64, height=64, steps=3, guidance_scale=7.5,
                         sampler="dpmpp_2m")
        [r] = Generator(models).generate(spec, [Sample(prompt="a coffee cup", seed=11)])
        sys.stdout.write(hashlib.sha256(encode_png(r.image)).hexdigest())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == png_sha(models)


# --- pretrained ------------------------------------------------------------------------------


def test_pretrained_sdxl_directory_is_recognised_and_loads(
    models: GenModels, tmp_path: Path
) -> None:
    """save_pretrained -> GENSEG_MODELS=pretrained (GENSEG_SD_ARCH left at sd15): the
    directory says it is SDXL; same weights, same image."""
    build_tiny_xl_pipeline().save_pretrained(tmp_path / "xl")
    build_tiny_pipeline().save_pretrained(tmp_path / "sd")
    assert detect_family(str(tmp_path / "xl")) == "sdxl"
    assert detect_family(str(tmp_path / "sd")) == "sd15"
    settings = Settings(models="pretrained", sd_model=str(tmp_path / "xl"))
    loaded = GenModels.from_settings(settings, RuntimeOptions(device="cpu"))
    assert loaded.family == "sdxl" and loaded.name == f"sdxl:{tmp_path / 'xl'}"
    assert png_sha(loaded) == png_sha(models)
    # SD_INPAINT_MODEL left at its SD 1.5 default: inpaint with the SDXL model's own
    # components (a 4-channel UNet), nothing downloaded.
    assert loaded.inpaint.unet is loaded.txt2img.unet
    assert loaded.inpaint_name == loaded.name
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 255)
    spec = BatchSpec(
        mode="inpaint", width=64, height=64, steps=2, guidance_scale=7.5, sampler="ddim"
    )
    [r] = Generator(loaded).generate(spec, [Sample("a cup", 1, image=image, mask=mask)])
    assert r.image.size == (64, 64)


def test_pretrained_sdxl_with_its_own_inpainting_model(tmp_path: Path) -> None:
    build_tiny_xl_pipeline().save_pretrained(tmp_path / "xl")
    build_tiny_xl_pipeline(inpaint=True).save_pretrained(tmp_path / "xl-inpaint")
    settings = Settings(
        models="pretrained",
        sd_model=str(tmp_path / "xl"),
        sd_inpaint_model=str(tmp_path / "xl-inpaint"),
    )
    loaded = GenModels.from_settings(settings, RuntimeOptions(device="cpu"))
    assert loaded.inpaint_name == f"sdxl:{tmp_path / 'xl-inpaint'}"
    assert loaded.inpaint.unet.config.in_channels == 9


def marker_file(path: Path, *keys: str, shape: tuple[int, ...] = (2, 2)) -> str:
    save_file({k: torch.zeros(shape) for k in keys}, str(path))
    return str(path)


def test_single_file_architecture_is_read_from_its_tensor_names(tmp_path: Path) -> None:
    """diffusers' own detection on the names of an original-layout checkpoint (the
    tensors here are placeholders: loading such a file needs a real checkpoint)."""
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    xl = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    refiner = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
    v1 = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
    assert detect_family(marker_file(tmp_path / "xl.safetensors", unet_in, xl)) == "sdxl"
    assert detect_family(marker_file(tmp_path / "v1.safetensors", unet_in, v1)) == "sd15"
    with pytest.raises(ValueError, match="refiner"):
        detect_family(marker_file(tmp_path / "refiner.safetensors", unet_in, refiner))
    # An SDXL inpainting file: 9 input channels and the second text encoder.
    save_file(
        {unet_in: torch.zeros(320, 9, 3, 3), xl: torch.zeros(2)}, str(tmp_path / "xli.safetensors")
    )
    assert detect_family(str(tmp_path / "xli.safetensors")) == "sdxl"
