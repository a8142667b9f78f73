"""Per-request LoRA adapters (``loras``): made here on the tiny models with peft, saved
with diffusers' ``save_lora_weights``, served from a GENSEG_LORA_DIR; and SDXL with a
LoRA end to end through the real CLI workers."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from consumers.stage import Output, PermanentError, StageContext
from gen_worker.architectures import build_tiny_pipeline, build_tiny_xl_pipeline
from gen_worker.generate import Generator
from gen_worker.handler import GenStage
from gen_worker.lora import LoraLibrary
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.blobstore import LocalBlobStore
from plumbing.images import PNG, encode_png
from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import (
    ImageReadyEvent,
    InpaintEvent,
    LoraSpec,
    PromptEvent,
    SegmentationOptions,
    Topics,
    parse_event,
)
from tests.kafka_utils import TopicReader
from tests.rel_utils import WorkerProcess, stop_all, worker_env

TOPICS = Topics("t")
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Iterator[None]:
    """Two threads at most: other suites share this machine's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


# --- adapters made here ------------------------------------------------------------------


def _adapter(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on ``model``'s ``targets`` with random (non-zero) A and B: peft's
    default init zeroes B, which would make an adapter that changes nothing."""
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
    inject_adapter_in_model(config, model, "default")
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name="default"))


def make_lora(
    build: Callable[[], Any], out: Path, seed: int, *, text_encoders: bool = True
) -> Path:
    """Save a LoRA for the pipeline ``build()`` makes: ``out`` ending in ``.safetensors``
    is one file, else a diffusers LoRA directory."""
    pipe = build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = {"unet_lora_layers": _adapter(pipe.unet, UNET_TARGETS)}
        if text_encoders:
            layers["text_encoder_lora_layers"] = _adapter(pipe.text_encoder, TEXT_TARGETS)
            if getattr(pipe, "text_encoder_2", None) is not None:
                layers["text_encoder_2_lora_layers"] = _adapter(pipe.text_encoder_2, TEXT_TARGETS)
    if out.suffix == ".safetensors":
        type(pipe).save_lora_weights(str(out.parent), weight_name=out.name, **layers)
    else:
        type(pipe).save_lora_weights(str(out), **layers)
    return out


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ink: SD 1.5 file (UNet + text encoder); sketch.v2: SD 1.5 directory (UNet only, a
    dot in its name); xl-ink: SDXL file (UNet + both text encoders); empty: no tensors;
    weights: tensors that are no LoRA."""
    d = tmp_path_factory.mktemp("loras")
    make_lora(build_tiny_pipeline, d / "ink.safetensors", seed=1)
    make_lora(build_tiny_pipeline, d / "sketch.v2", seed=2, text_encoders=False)
    make_lora(build_tiny_xl_pipeline, d / "xl-ink.safetensors", seed=3)
    save_file({}, str(d / "empty.safetensors"))
    save_file({"conv.weight": torch.ones(4, 4)}, str(d / "weights.safetensors"))
    (d / "notes.txt").write_text("not an adapter")
    return d


# --- the stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> GenModels:
    return GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))


@pytest.fixture(scope="module")
def xl_models() -> GenModels:
    settings = Settings(models="tiny", sd_arch="sdxl")
    return GenModels.from_settings(settings, RuntimeOptions(device="cpu"))


def lora_settings(lora_dir: Path | None, **kw: Any) -> Settings:
    return Settings(models="tiny", lora_dir=str(lora_dir) if lora_dir else None, **kw)


@pytest.fixture
def stage(models: GenModels, lora_dir: Path) -> GenStage:
    return GenStage(lora_settings(lora_dir, max_loras=2), models=models)


@pytest.fixture
def ctx(tmp_path: Path) -> StageContext:
    def emit(output: Output, item: int | None) -> None:
        pass

    return StageContext(
        blob=LocalBlobStore(tmp_path / "blobs"), topics=TOPICS, settings=Settings(), emit=emit
    )


def prompt(id: str = "l1", *loras: tuple[str, float], **kw: Any) -> PromptEvent:
    base: dict[str, Any] = {
        "prompt": "a coffee cup on a wooden table",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 7,
        "targets": ["cup"],
        "loras": [{"name": n, "scale": s} for n, s in loras],
    }
    return PromptEvent(id=id, **{**base, **kw})


def ready(result: Any) -> ImageReadyEvent:
    if isinstance(result, BaseException):
        raise result
    [output] = result
    return parse_event(output.event.to_json_bytes(), ImageReadyEvent)


def sha(stage: GenStage, ctx: StageContext, event: PromptEvent) -> str:
    return ready(stage.handle([event], ctx)[0]).image.sha256


def test_a_lora_changes_the_image_is_reported_and_never_leaks(
    stage: GenStage, ctx: StageContext
) -> None:
    base = ready(stage.handle([prompt("base")], ctx)[0])
    styled = ready(stage.handle([prompt("ink", ("ink", 0.8))], ctx)[0])
    assert styled.image.sha256 != base.image.sha256
    assert styled.params.loras == [LoraSpec(name="ink", scale=0.8)]
    assert base.params.loras is None
    assert styled.model == base.model == "tiny"  # the adapters are in params, not the name
    assert set(styled.heatmaps) == {"cup"}
    # A batch without adapters after one with them: the base model's image, bit for bit.
    assert sha(stage, ctx, prompt("base")) == base.image.sha256
    # Scale matters, and is part of the batch key.
    assert sha(stage, ctx, prompt("half", ("ink", 0.4))) not in (
        styled.image.sha256,
        base.image.sha256,
    )
    assert stage.batch_key(prompt("a", ("ink", 0.4))) != stage.batch_key(prompt("b", ("ink", 0.8)))


def test_different_adapters_in_one_batch_window_each_get_their_own(
    stage: GenStage, ctx: StageContext
) -> None:
    events = [
        prompt("a", ("ink", 1.0)),
        prompt("b", ("sketch.v2", 0.5)),
        prompt("c"),
        prompt("d", ("ink", 1.0), ("sketch.v2", 0.5)),
        prompt("e", ("ink", 1.0), prompt="a red dog", seed=3),
    ]
    alone = [sha(stage, ctx, e) for e in events]
    assert len(set(alone)) == len(alone)
    keys = [stage.batch_key(e) for e in events]
    assert keys[0] == keys[4] and len(set(keys)) == 4
    together = [ready(r).image.sha256 for r in stage.handle(events, ctx)]
    assert together == alone
    # The same adapter set listed in another order: the same batch, the same image.
    swapped = prompt("d", ("sketch.v2", 0.5), ("ink", 1.0))
    assert stage.batch_key(swapped) == keys[3]
    assert sha(stage, ctx, swapped) == alone[3]


def test_refused_adapters_dead_letter_with_their_reason(
    stage: GenStage, ctx: StageContext, models: GenModels
) -> None:
    base = sha(stage, ctx, prompt("base"))
    events = [
        prompt("unknown", ("nowhere", 1.0)),
        prompt("too-many", ("ink", 1.0), ("sketch.v2", 1.0), ("empty", 1.0)),
        prompt("xl-on-sd15", ("xl-ink", 1.0)),
        prompt("empty", ("empty", 1.0)),
        prompt("weights", ("weights", 1.0)),
        prompt("notes", ("notes.txt", 1.0)),
        prompt("good", ("ink", 1.0)),
        prompt("base"),
    ]
    results = stage.handle(events, ctx)
    expected = {
        "unknown": ("lora_not_found", "'nowhere'"),
        "too-many": ("too_many_loras", "at most 2"),
        "xl-on-sd15": ("invalid_lora", "sd15 model"),
        "empty": ("invalid_lora", "'empty'"),
        "weights": ("invalid_lora", "'weights'"),
        "notes": ("lora_not_found", "notes.txt"),
    }
    for event, result in zip(events, results, strict=True):
        if event.id in expected:
            error_type, words = expected[event.id]
            assert isinstance(result, PermanentError), (event.id, result)
            assert result.error_type == error_type and words in str(result), str(result)
            assert "\n" not in str(result)
    assert ready(results[6]).params.loras == [LoraSpec(name="ink")]
    assert ready(results[7]).image.sha256 == base
    # Failed loads left nothing behind: only the good adapters are loaded.
    loaded = models.txt2img.get_list_adapters()
    cache = stage.generator.adapters()
    assert cache is not None
    assert set(loaded["unet"]) == set(cache.loaded) and len(loaded["unet"]) <= 2
    assert sha(stage, ctx, prompt("base")) == base


def test_adapters_apply_to_progressive_refinement_and_inpainting(
    stage: GenStage, ctx: StageContext
) -> None:
    """Progressive refinement shares the text-to-image networks (and their adapters); the
    inpainting UNet is another network: its adapters are loaded into it separately."""
    progressive = {"progressive": {"draft_scale": 0.5, "strength": 0.5}, "width": 128}
    plain = sha(stage, ctx, prompt("p", **progressive))
    assert sha(stage, ctx, prompt("p", ("ink", 1.0), **progressive)) != plain
    assert sha(stage, ctx, prompt("p", **progressive)) == plain

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    image = ctx.blob.put("in/image.png", encode_png(Image.new("RGB", (64, 64), "red")), PNG)

    def inpaint(*loras: tuple[str, float]) -> InpaintEvent:
        return InpaintEvent(
            id="in",
            prompt="a red apple",
            width=64,
            height=64,
            steps=3,
            seed=5,
            image=image,
            mask=ctx.blob.put("in/mask.png", encode_png(mask), PNG),
            loras=[{"name": n, "scale": s} for n, s in loras],
        )

    base = ready(stage.handle([inpaint()], ctx)[0])
    styled = ready(stage.handle([inpaint(("ink", 1.0))], ctx)[0])
    assert styled.image.sha256 != base.image.sha256 and styled.params.mode == "inpaint"
    assert ready(stage.handle([inpaint()], ctx)[0]).image.sha256 == base.image.sha256
    cache = stage.generator.adapters("inpaint")
    assert cache is not None and cache is not stage.generator.adapters()


def test_a_worker_without_lora_dir_refuses_adapters(models: GenModels, ctx: StageContext) -> None:
    plain = GenStage(lora_settings(None), models=models)
    [refused, fine] = plain.handle([prompt("x", ("ink", 1.0)), prompt("y")], ctx)
    assert isinstance(refused, PermanentError) and refused.error_type == "lora_not_found"
    assert "GENSEG_LORA_DIR" in str(refused)
    assert ready(fine).params.loras is None


def test_least_recently_used_adapters_are_unloaded(lora_dir: Path, ctx: StageContext) -> None:
    """A cache of one adapter: loading the second unloads the first; asking for the first
    again reloads it and makes the same image."""
    fresh = GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))
    library = LoraLibrary(lora_dir, max_per_request=1)
    settings = lora_settings(lora_dir, max_loras=1)
    stage = GenStage(settings, generator=Generator(fresh, loras=library, lora_cache_size=1))
    first = sha(stage, ctx, prompt("a", ("ink", 1.0)))
    sketch = sha(stage, ctx, prompt("b", ("sketch.v2", 1.0)))
    cache = stage.generator.adapters()
    assert cache is not None and [f.name for f in cache.loaded.values()] == ["sketch.v2"]
    assert fresh.txt2img.get_list_adapters() == {"unet": list(cache.loaded)}
    assert sha(stage, ctx, prompt("a", ("ink", 1.0))) == first != sketch
    assert [f.name for f in cache.loaded.values()] == ["ink"]


def test_a_changed_adapter_file_is_reloaded(
    lora_dir: Path, tmp_path: Path, ctx: StageContext
) -> None:
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(lora_dir / "ink.safetensors", own / "ink.safetensors")
    fresh = GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))
    stage = GenStage(lora_settings(own), models=fresh)
    before = sha(stage, ctx, prompt("a", ("ink", 1.0)))
    assert sha(stage, ctx, prompt("a", ("ink", 1.0))) == before  # cached
    make_lora(build_tiny_pipeline, own / "ink.safetensors", seed=99)
    assert sha(stage, ctx, prompt("a", ("ink", 1.0))) != before


def test_lora_on_sdxl(xl_models: GenModels, lora_dir: Path, ctx: StageContext) -> None:
    stage = GenStage(lora_settings(lora_dir, sd_arch="sdxl"), models=xl_models)
    base = sha(stage, ctx, prompt("base"))
    events = [prompt("xl", ("xl-ink", 0.7)), prompt("other", ("xl-ink", 0.7), seed=8), prompt()]
    alone = [sha(stage, ctx, e) for e in events]
    results = stage.handle(events, ctx)
    assert [ready(r).image.sha256 for r in results] == alone
    assert alone[0] != base and alone[2] == base
    styled = ready(results[0])
    assert styled.model == "sdxl:tiny" and styled.params.loras == [
        LoraSpec(name="xl-ink", scale=0.7)
    ]
    assert set(styled.heatmaps) == {"cup"}
    loaded = xl_models.txt2img.get_list_adapters()
    assert set(loaded) == {"unet", "text_encoder", "text_encoder_2"}  # all three adapted
    [refused] = stage.handle([prompt("sd15-on-xl", ("ink", 1.0))], ctx)
    assert isinstance(refused, PermanentError) and refused.error_type == "invalid_lora"
    assert "sdxl model" in str(refused)
    assert sha(stage, ctx, prompt("base")) == base


# --- end to end through the CLI workers ----------------------------------------------------


@pytest.mark.timeout(480)
async def test_sdxl_with_a_lora_end_to_end_through_the_cli_workers(
    settings: Settings, tmp_path: Path, lora_dir: Path
) -> None:
    """``genseg worker gen`` (GENSEG_SD_ARCH=sdxl, GENSEG_LORA_DIR) and ``genseg worker
    seg`` as processes: a prompt with an SDXL adapter reaches asset-ready; an SD 1.5
    adapter and an unknown one end in dead letters with their reasons."""
    await ensure_topics(settings, partitions=1)
    env = worker_env(settings, GENSEG_SD_ARCH="sdxl", GENSEG_LORA_DIR=str(lora_dir))
    gen = WorkerProcess("gen", env, tmp_path)
    seg = WorkerProcess("seg", env, tmp_path)
    seg_options = SegmentationOptions(min_confidence=0.0)
    events = [
        prompt("e2e-ok", ("xl-ink", 0.7), segmentation=seg_options),
        prompt("e2e-sd15", ("ink", 1.0)),
        prompt("e2e-unknown", ("nowhere", 1.0)),
    ]
    try:
        gen.start()
        seg.start()
        await asyncio.gather(gen.wait_assigned(timeout=240), seg.wait_assigned(timeout=240))
        async with TopicReader(settings, "images", "assets", "dlq") as reader:
            async with Publisher(settings) as pub:
                for e in events:
                    sent = await pub.send(
                        settings.topics.prompts, e.to_json_bytes(), key=e.id, headers=[]
                    )
                    await sent

            def done() -> bool:
                gen.check_alive()
                seg.check_alive()
                ended = set(reader.keys("assets")) | {d.get("id") for d in reader.values("dlq")}
                return {e.id for e in events} <= ended

            await reader.until(done, timeout=240)
    finally:
        stop_all([gen, seg])
    [image] = [i for i in reader.values("images") if i["id"] == "e2e-ok"]
    assert image["model"] == "sdxl:tiny"
    assert image["params"]["loras"] == [{"name": "xl-ink", "scale": 0.7}]
    [asset] = [a for a in reader.values("assets") if a["id"] == "e2e-ok"]
    assert asset["image"]["sha256"] == image["image"]["sha256"]
    errors = {d["id"]: d["error"] for d in reader.values("dlq")}
    assert errors["e2e-sd15"]["type"] == "invalid_lora"
    assert errors["e2e-unknown"]["type"] == "lora_not_found"
    assert "e2e-ok" not in errors
    # The same request in this process, with the same tiny SDXL and adapter: same bytes.
    local = GenModels.from_settings(
        Settings(models="tiny", sd_arch="sdxl"), RuntimeOptions(device="cpu")
    )
    stage = GenStage(lora_settings(lora_dir, sd_arch="sdxl"), models=local)
    blob = LocalBlobStore(tmp_path / "local-blobs")
    ctx = StageContext(blob=blob, topics=TOPICS, settings=settings, emit=lambda o, i: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with --torch-threads 1
    try:
        again = ready(stage.handle([events[0]], ctx)[0])
    finally:
        torch.set_num_threads(threads)
    assert again.image.sha256 == image["image"]["sha256"]
