"""The generator stage on the tiny profile: GenStage.handle with a real StageContext."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from consumers.stage import Output, PermanentError, StageContext
from gen_worker.generate import Generator
from gen_worker.handler import GenStage
from gen_worker.profiles import GenModels, RuntimeOptions
from gen_worker.requests import default_seed
from gen_worker.samplers import SAMPLERS
from plumbing.blobstore import BlobNotFound, LocalBlobStore
from plumbing.images import decode_heatmap, decode_image, encode_png
from plumbing.settings import Settings
from schemas import (
    BlobRef,
    ImageReadyEvent,
    InpaintEvent,
    ProgressEvent,
    PromptEvent,
    SceneOptions,
    Topics,
    parse_event,
)

TOPICS = Topics("t")


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Iterator[None]:
    """Two threads at most: other suites share this machine's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> GenModels:
    return GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))


@pytest.fixture
def stage(models: GenModels) -> GenStage:
    return GenStage(Settings(models="tiny"), models=models)


class Recorder:
    """Collects what a handler emits (progress) through StageContext.emit."""

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
        blob=LocalBlobStore(tmp_path / "blobs"),
        topics=TOPICS,
        settings=Settings(models="tiny"),
        emit=emitted,
    )


def prompt(id: str = "r1", **kw: Any) -> PromptEvent:
    base: dict[str, Any] = {
        "prompt": "a coffee cup on a wooden table",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 7,
    }
    return PromptEvent(id=id, **{**base, **kw})


def ok(result: Any) -> list[Output]:
    if isinstance(result, BaseException):
        raise result
    return result


def ready_events(result: Any) -> list[ImageReadyEvent]:
    """The image-ready events of one item, re-read from their record bytes (the contract)."""
    outputs = ok(result)
    assert all(o.topic == TOPICS.images for o in outputs)
    return [parse_event(o.event.to_json_bytes(), ImageReadyEvent) for o in outputs]


def image_bytes(ctx: StageContext, ref: BlobRef) -> bytes:
    return ctx.blob.get(ref)


# --- the handler's events ---------------------------------------------------------------


def test_image_ready_events_follow_the_contract(
    stage: GenStage, ctx: StageContext, emitted: Recorder
) -> None:
    event = prompt(
        width=64,
        height=96,
        num_images=2,
        seed=41,
        targets=["coffee cup", "zebra"],
        negative_prompt="blurry",
        steps=4,
    )
    [result] = stage.handle([event], ctx)
    events = ready_events(result)
    assert [e.image_index for e in events] == [0, 1]
    for k, e in enumerate(events):
        assert e.id == "r1" and e.model == "tiny"
        assert e.params.seed == 41 + k
        assert (e.params.width, e.params.height, e.params.steps) == (64, 96, 4)
        assert e.params.sampler == "dpmpp_2m" and e.params.mode == "txt2img"
        assert e.params.negative_prompt == "blurry" and e.params.num_images == 2
        assert e.targets == ["coffee cup", "zebra"]
        assert e.missing_targets == ["zebra"]
        assert set(e.heatmaps) == {"coffee cup"}
        assert {"text_encode", "denoise", "decode", "blob_write"} <= set(e.timings_ms)
        assert e.image.uri.endswith(f"r1/{k}/gen/image.png")
        image = decode_image(image_bytes(ctx, e.image), max_pixels=10**6)
        assert image.size == (64, 96)  # PIL: (width, height)
        heat = decode_heatmap(image_bytes(ctx, e.heatmaps["coffee cup"]))
        assert heat.shape == (12, 8)  # latent resolution, the image's aspect ratio
        assert heat.min() == 0.0 and heat.max() == 1.0  # min-max normalised
    assert image_bytes(ctx, events[0].image) != image_bytes(ctx, events[1].image)

    progress = [(o.event, item) for o, item in emitted.emitted]
    assert progress, "progress events were emitted"
    assert all(o.topic == TOPICS.progress for o, _ in emitted.emitted)
    assert all(isinstance(p, ProgressEvent) and p.id == "r1" and item == 0 for p, item in progress)
    assert progress[-1][0].step == progress[-1][0].steps == 4


def test_progress_is_throttled_but_ends_on_the_last_step(
    models: GenModels, ctx: StageContext, emitted: Recorder
) -> None:
    ticks = iter(range(1000))  # a clock that advances 1 s per reading

    throttled = GenStage(
        Settings(models="tiny"),
        models=models,
        progress_interval_s=2.5,
        clock=lambda: float(next(ticks)),
    )
    ok(throttled.handle([prompt(steps=8)], ctx)[0])
    steps = [o.event.step for o, _ in emitted.emitted]
    assert steps == [1, 4, 7, 8]


def test_seed_is_chosen_when_absent_and_wraps(stage: GenStage, ctx: StageContext) -> None:
    [a, b] = stage.handle(
        [prompt(id="no-seed", seed=None), prompt(id="wrap", seed=2**32 - 1, num_images=2)], ctx
    )
    [chosen] = ready_events(a)
    assert chosen.params.seed == default_seed("no-seed")
    assert [e.params.seed for e in ready_events(b)] == [2**32 - 1, 0]
    # A redelivery regenerates the same bytes, so earlier references stay valid.
    [again] = ready_events(stage.handle([prompt(id="no-seed", seed=None)], ctx)[0])
    assert again.image == chosen.image


def test_same_request_is_byte_identical_alone_and_in_a_batch(
    stage: GenStage, ctx: StageContext
) -> None:
    request = prompt(id="same", width=64, height=96, targets=["cup"], num_images=2)
    alone = ready_events(stage.handle([request], ctx)[0])
    others = [
        prompt(id="o1", prompt="a red dog", seed=3, width=64, height=96),
        prompt(id="o2", prompt="a cup", seed=7, width=64, height=96, num_images=3, targets=["cup"]),
    ]
    assert len({stage.batch_key(e) for e in [request, *others]}) == 1
    results = stage.handle([others[0], request, others[1]], ctx)
    batched = ready_events(results[1])
    for a, b in zip(alone, batched, strict=True):
        assert a.image == b.image  # same sha256: byte-identical PNG
        assert a.heatmaps == b.heatmaps
    # Same seed, other prompt: another image (the comparison above can fail).
    assert ready_events(results[2])[0].image.sha256 != alone[0].image.sha256


def test_recording_heatmaps_does_not_change_the_image(stage: GenStage, ctx: StageContext) -> None:
    [with_targets] = ready_events(stage.handle([prompt(targets=["coffee cup"])], ctx)[0])
    [without] = ready_events(stage.handle([prompt()], ctx)[0])
    assert with_targets.heatmaps and not without.heatmaps
    assert with_targets.image.sha256 == without.image.sha256


def test_batch_key_groups_only_compatible_requests(stage: GenStage) -> None:
    base = stage.batch_key(prompt())
    assert base is not None
    assert (
        stage.batch_key(
            prompt(
                id="x", prompt="other", seed=1, num_images=3, targets=["dog"], negative_prompt="n"
            )
        )
        == base
    )
    for change in (
        {"width": 128},
        {"height": 72},
        {"steps": 4},
        {"sampler": "ddim"},
        {"guidance_scale": 5.0},
        {"progressive": {"draft_scale": 0.5}},
        {"loras": [{"name": "ink"}]},  # the adapter set is part of the key (test_gen_lora.py)
    ):
        assert stage.batch_key(prompt(**change)) != base, change


def test_every_sampler_runs(stage: GenStage, ctx: StageContext) -> None:
    shas = {}
    for sampler in SAMPLERS:
        [e] = ready_events(stage.handle([prompt(id=f"s-{sampler}", sampler=sampler)], ctx)[0])
        assert e.params.sampler == sampler
        shas[sampler] = e.image.sha256
    assert len(set(shas.values())) == len(SAMPLERS), shas


def test_guidance_off_runs_without_the_unconditional_half(
    stage: GenStage, ctx: StageContext
) -> None:
    [e] = ready_events(stage.handle([prompt(guidance_scale=1.0, targets=["cup"])], ctx)[0])
    assert e.params.guidance_scale == 1.0 and set(e.heatmaps) == {"cup"}


def test_progressive_generation(stage: GenStage, ctx: StageContext, emitted: Recorder) -> None:
    event = prompt(
        width=128,
        height=96,
        steps=4,
        targets=["cup"],
        progressive={"draft_scale": 0.5, "strength": 0.5},
    )
    [e] = ready_events(stage.handle([event], ctx)[0])
    assert e.params.progressive is not None and e.params.progressive.strength == 0.5
    assert decode_image(image_bytes(ctx, e.image), max_pixels=10**6).size == (128, 96)
    assert decode_heatmap(image_bytes(ctx, e.heatmaps["cup"])).shape == (12, 16)
    last = emitted.emitted[-1][0].event
    assert (last.step, last.steps) == (6, 6)  # 4 draft steps + 4 * 0.5 refine steps


# --- inpainting ------------------------------------------------------------------------------


def put_png(ctx: StageContext, key: str, image: Image.Image) -> BlobRef:
    return ctx.blob.put(key, encode_png(image), "image/png")


def inpaint_event(
    ctx: StageContext,
    id: str = "in1",
    size: tuple[int, int] = (64, 64),
    mask_size: tuple[int, int] | None = None,
    **kw: Any,
) -> InpaintEvent:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    mask = Image.new("L", mask_size or size, 0)
    mask.paste(255, (16, 16, 48, 48))  # white = regenerate
    return InpaintEvent(
        id=id,
        prompt="a red apple",
        width=64,
        height=64,
        steps=3,
        seed=5,
        image=put_png(ctx, f"inputs/{id}/image.png", Image.fromarray(pixels)),
        mask=put_png(ctx, f"inputs/{id}/mask.png", mask),
        **kw,
    )


def test_inpainting_produces_an_image_ready_event(stage: GenStage, ctx: StageContext) -> None:
    event = inpaint_event(ctx, targets=["apple", "pear"], strength=0.75)
    assert stage.batch_key(event) != stage.batch_key(prompt())
    [e] = ready_events(stage.handle([event], ctx)[0])
    assert e.params.mode == "inpaint" and e.model == "tiny-inpaint"
    assert decode_image(image_bytes(ctx, e.image), max_pixels=10**6).size == (64, 64)
    assert set(e.heatmaps) == {"apple"} and e.missing_targets == ["pear"]


def test_inpaint_inputs_are_checked_per_item(stage: GenStage, ctx: StageContext) -> None:
    bad_mask = inpaint_event(ctx, id="bad-mask", mask_size=(64, 72))
    bad_size = inpaint_event(ctx, id="bad-size", size=(72, 64), mask_size=(72, 64))
    missing = inpaint_event(ctx, id="missing")
    missing = missing.model_copy(
        update={
            "mask": BlobRef(
                uri=ctx.blob.uri_for("inputs/nowhere.png"),
                sha256="0" * 64,
                media_type="image/png",
                bytes=10,
            )
        }
    )
    good = inpaint_event(ctx, id="good")
    results = stage.handle([bad_mask, bad_size, missing, good], ctx)
    assert isinstance(results[0], PermanentError) and "mask" in str(results[0])
    assert results[0].error_type == "invalid_request"
    assert isinstance(results[1], PermanentError) and "72x64" in str(results[1])
    assert isinstance(results[2], BlobNotFound)  # the runtime classifies blob errors
    [e] = ready_events(results[3])
    assert e.id == "good"


# --- out of memory ---------------------------------------------------------------------------


class OOMAbove(Generator):
    """A generator whose device 'has memory' for at most ``limit`` images per call
    (and none at all when ``limit`` is 0, unless in low-memory mode if ``low_ok``)."""

    def __init__(self, models: GenModels, limit: int, low_ok: bool = False) -> None:
        super().__init__(models)
        self.limit, self.low_ok = limit, low_ok
        self.calls: list[tuple[int, bool]] = []

    def generate(self, spec, samples, *, low_memory=False, **kw):  # type: ignore[override]
        self.calls.append((len(samples), low_memory))
        if len(samples) > self.limit and not (low_memory and self.low_ok):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(spec, samples, low_memory=low_memory, **kw)


def test_oom_splits_the_batch_and_keeps_images_identical(
    models: GenModels, stage: GenStage, ctx: StageContext
) -> None:
    events = [prompt(id=f"m{i}", seed=i, num_images=2 if i == 1 else 1) for i in range(3)]
    expected = [ready_events(r) for r in stage.handle(events, ctx)]
    flaky = OOMAbove(models, limit=1)
    results = GenStage(Settings(models="tiny"), generator=flaky).handle(events, ctx)
    got = [[e.image for e in ready_events(r)] for r in results]
    assert got == [[e.image for e in x] for x in expected]
    # 4 images -> 2 + 2 -> 1 + 1 each; never the low-memory mode.
    assert flaky.calls == [
        (4, False),
        (2, False),
        (1, False),
        (1, False),
        (2, False),
        (1, False),
        (1, False),
    ]


def test_oom_even_alone_falls_back_to_low_memory_then_gives_up(
    models: GenModels, ctx: StageContext
) -> None:
    low = OOMAbove(models, limit=0, low_ok=True)
    event = prompt(targets=["cup"])
    [result] = GenStage(Settings(models="tiny"), generator=low).handle([event], ctx)
    [ready] = ready_events(result)
    assert set(ready.heatmaps) == {"cup"}  # sliced self-attention kept the recorder
    assert low.calls == [(1, False), (1, True)]
    # Low-memory mode is undone afterwards: processors and VAE tiling are restored.
    kinds = {type(p).__name__ for p in models.txt2img.unet.attn_processors.values()}
    assert kinds == {"AttnProcessor2_0", "CrossAttentionRecorder"}
    assert not models.txt2img.vae.use_tiling

    never = OOMAbove(models, limit=0)
    results = GenStage(Settings(models="tiny"), generator=never).handle(
        [prompt(id="a"), prompt(id="b", num_images=2)], ctx
    )
    for r in results:
        assert isinstance(r, PermanentError) and r.error_type == "out_of_memory"
        assert "out of memory" in str(r)
    assert never.calls == [
        (3, False),
        (2, False),
        (1, False),
        (1, True),
        (1, False),
        (1, True),
        (1, False),
        (1, True),
    ]


def test_other_generation_errors_fail_the_batch_items_without_raising(
    models: GenModels, ctx: StageContext
) -> None:
    class Broken(Generator):
        def generate(self, *a, **kw):  # type: ignore[override]
            raise RuntimeError("device lost")

    results = GenStage(Settings(models="tiny"), generator=Broken(models)).handle(
        [prompt(id="a"), prompt(id="b")], ctx
    )
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in results)


def test_tenant_and_scene_are_carried_through(
    stage: GenStage, ctx: StageContext, emitted: Recorder
) -> None:
    scene = SceneOptions(scene_id="room", view="45", views_total=4, angle=45, outputs=["depth"])
    event = PromptEvent(
        id="r1", subject="a cup", style="watercolor", width=64, height=64, steps=2,
        tenant="acme", scene=scene,
    )  # fmt: skip
    [outputs] = stage.handle([event], ctx)
    assert isinstance(outputs, list)
    ready = outputs[0].event
    assert isinstance(ready, ImageReadyEvent)
    assert ready.tenant == "acme" and ready.scene == scene
    assert ready.params.prompt == "a cup, watercolor"
    progress = [output.event for output, _ in emitted.emitted]
    assert progress and all(isinstance(e, ProgressEvent) and e.tenant == "acme" for e in progress)
