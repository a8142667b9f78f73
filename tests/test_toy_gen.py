"""The toy generator: its tokenizer, its training loop, and the shipped weights.

Real diffusers/transformers classes throughout; the training test runs the real
recipe for two steps, the profile tests load through the ``pretrained`` code path.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.stage import Output, PermanentError, StageContext
from gen_worker.generate import BatchSpec, Generator, Sample
from gen_worker.handler import GenStage
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.blobstore import LocalBlobStore
from plumbing.images import decode_image
from plumbing.settings import Settings
from schemas import ImageReadyEvent, PromptEvent, Topics
from toy.bf16 import SLOW_BF16
from toy.gen_losses import attention_loss, cell_weights, shape_contrast, shape_swap_table
from toy.gen_model import MAX_TOKENS, TOY_WORDS, TrainConfig, build_models, toy_tokenizer
from toy.recipe import recipe_main
from toy.train_gen import edge_weights, train, warn_if_bf16_is_slow
from toy.weights import SD_DIR
from toy.world import PALETTE, SHAPES, classify_shape, find_object, make_scene


def test_every_toy_word_is_one_token_and_captions_fit() -> None:
    tokenizer = toy_tokenizer()
    for word in TOY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = max((make_scene(seed).caption for seed in range(300)), key=len)
    ids = tokenizer(longest).input_ids
    assert len(ids) <= MAX_TOKENS, (longest, tokenizer.convert_ids_to_tokens(ids))


def test_attention_loss_rewards_attention_on_the_object() -> None:
    """Token 1 names object 0; attention on its mask costs less than attention beside it."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 4:8, 4:8] = 1.0
    token_object = torch.tensor([[-1, 0, -1]])

    def maps_at(y: slice, x: slice) -> list[torch.Tensor]:
        spatial = torch.full((16, 16), 1e-4)
        spatial[y, x] = 1.0
        probs = torch.stack([torch.full((16, 16), 0.5), spatial, torch.full((16, 16), 0.5)])
        return [probs.flatten(1).T.unsqueeze(0)]  # [B=1, Q=256, T=3]

    on = attention_loss(maps_at(slice(4, 8), slice(4, 8)), token_object, mask)
    beside = attention_loss(maps_at(slice(10, 14), slice(10, 14)), token_object, mask)
    assert float(on) < 0.05 < 1.0 < float(beside)
    none = attention_loss(maps_at(slice(4, 8), slice(4, 8)), torch.full((1, 3), -1), mask)
    assert float(none) == 0.0


def test_training_runs_and_saves_a_loadable_pipeline(tmp_path: Path, restore_threads) -> None:
    # fp32: the save and load path is the subject (bf16 steps, emulated on a CPU without
    # bf16 instructions, take 6 times as long; the tests below train in bf16).
    cfg = TrainConfig(
        scenes=16, threads=1, vae_steps=2, vae_batch=4, unet_steps=3, batch=4, warmup=1,
        log_every=1, precision="fp32",
    )  # fmt: skip
    out = tmp_path / "sd"
    pipe = train(out, cfg)
    fresh_unet = build_models(toy_tokenizer(), cfg)[2]
    trained = dict(pipe.unet.named_parameters())
    changed = [n for n, p in fresh_unet.named_parameters() if not torch.equal(p, trained[n])]
    assert changed, "training changed no UNet weight"
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' spread
    assert (out / "model_index.json").is_file() and (out / "train_config.json").is_file()

    models = GenModels.from_settings(
        Settings(models="toy", toy_sd_model=str(out)), RuntimeOptions(device="cpu")
    )
    assert models.txt2img.unet.dtype == torch.float32  # saved fp16, loaded as asked
    spec = BatchSpec("txt2img", 64, 64, steps=2, guidance_scale=7.5, sampler="dpmpp_2m")
    [result] = Generator(models).generate(
        spec, [Sample("a red circle next to a blue square", seed=1, targets=("red circle",))]
    )
    assert result.image.size == (64, 64)
    assert result.heatmaps["red circle"].shape == (16, 16)


def test_experiment_options_train_and_load(tmp_path: Path, restore_threads) -> None:
    """The recipe's experiment options (bf16 autocast, edge-weighted VAE loss, 8 latent
    channels, weighted latent cells, the caption in the time embedding, the shape
    contrast) train a pipeline that loads and draws like the default one."""
    cfg = TrainConfig(
        scenes=8, threads=1, vae_steps=2, vae_batch=4, unet_steps=2, batch=4, warmup=1,
        log_every=1, precision="bf16", vae_edge_weight=2.0, latent_channels=8,
        object_cell_weight=1.0, edge_cell_weight=4.0, text_time_embedding=True,
        shape_contrast_weight=1.0,
    )  # fmt: skip
    pipe = train(tmp_path / "sd", cfg)
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 8
    assert pipe.unet.config.addition_embed_type == "text"
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    models = GenModels.from_settings(
        Settings(models="toy", toy_sd_model=str(tmp_path / "sd")), RuntimeOptions(device="cpu")
    )
    spec = BatchSpec("txt2img", 64, 64, steps=2, guidance_scale=7.5, sampler="dpmpp_2m")
    [result] = Generator(models).generate(spec, [Sample("a red circle", seed=1)])
    assert result.image.size == (64, 64)


def test_training_warns_when_this_cpu_emulates_bf16(caplog: pytest.LogCaptureFixture) -> None:
    assert warn_if_bf16_is_slow(TrainConfig(precision="fp32")) is None
    with caplog.at_level("WARNING", logger="toy.train_gen"):
        slowdown = warn_if_bf16_is_slow(TrainConfig())  # the recipe: bf16 on the CPU
    assert slowdown is not None and slowdown > 0
    warned = "no fast bf16" in caplog.text
    assert warned == (slowdown > SLOW_BF16), f"{slowdown:.1f}x: {caplog.text!r}"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2 " in flags and " avx512f " not in flags:  # e.g. this VM's Zen 3 days
        assert warned, f"an AVX2-only CPU emulates bf16, yet {slowdown:.1f}x"


def test_edge_weights_count_shape_edges_not_gradients() -> None:
    ramp = torch.linspace(-1, 1, 16).repeat(1, 3, 16, 1)  # a background gradient
    assert torch.equal(edge_weights(ramp, 4.0), torch.ones(1, 1, 16, 16))
    square = -torch.ones(1, 3, 16, 16)
    square[..., 4:12, 4:12] = 1.0
    weights = edge_weights(square, 4.0)
    assert weights[0, 0, 4, 4] == 5.0 and weights[0, 0, 8, 8] == 1.0 and weights[0, 0, 0, 0] == 1.0


def test_cell_weights_favour_object_edges_and_keep_the_loss_size() -> None:
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, 4:8, 4:8] = 1.0
    masks[0, 0, 8, 4:8] = 0.5  # the object's edge row covers half of each cell
    weights = cell_weights(masks, object_weight=1.0, edge_weight=4.0)
    assert weights.shape == (1, 1, 16, 16)
    assert torch.allclose(weights.mean(), torch.tensor(1.0))
    edge, inside, outside = weights[0, 0, 8, 5], weights[0, 0, 5, 5], weights[0, 0, 0, 0]
    assert edge > inside > outside
    assert torch.allclose(torch.stack([edge, inside]) / outside, torch.tensor([5.5, 2.0]))
    assert torch.equal(cell_weights(masks, 0.0, 0.0), torch.ones(1, 1, 16, 16))


def test_shape_swap_and_contrast_hinge() -> None:
    tokenizer = toy_tokenizer()
    table = shape_swap_table(tokenizer, SHAPES)
    ids = tokenizer("a red circle next to a blue star", return_tensors="pt").input_ids[0]
    assert tokenizer.decode(table[ids], skip_special_tokens=True) == (
        "a red square next to a blue circle"
    )
    # The training saves this tokenizer: building the table leaves its state as it was.
    tokenizer("a", padding="max_length", max_length=MAX_TOKENS)  # a padding state
    state = tokenizer.backend_tokenizer.to_str()
    shape_swap_table(tokenizer, SHAPES)
    assert tokenizer.backend_tokenizer.to_str() == state
    with pytest.raises(ValueError, match="hexagon"):
        shape_swap_table(tokenizer, ["hexagon"])
    right = torch.tensor([1.0, 1.0], requires_grad=True)
    swapped = torch.tensor([1.05, 2.0], requires_grad=True)
    loss = shape_contrast(right, swapped, margin=0.1)
    assert torch.isclose(loss, torch.tensor(0.025))  # only the first is inside the margin
    loss.backward()
    assert right.grad.tolist() == [0.5, 0.0] and swapped.grad.tolist() == [-0.5, 0.0]


@pytest.fixture(scope="module")
def shipped() -> Generator:
    return Generator(GenModels.from_settings(Settings(models="toy"), RuntimeOptions(device="cpu")))


def test_the_toy_profile_loads_the_shipped_weights_like_pretrained(shipped: Generator) -> None:
    assert shipped.models.profile == "toy"
    assert Path(shipped.models.name) == SD_DIR
    assert (SD_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def asked_objects(prompt: str) -> list[tuple[str, str]]:
    """``[("red", "circle"), ...]``: the colour-shape pairs a toy caption names."""
    words = prompt.replace(",", "").split()
    return [(c, s) for c, s in pairwise(words) if c in PALETTE]


def drawn_shape(image: np.ndarray, colour: str, shape: str) -> str | None:
    """The shape of the region of ``colour`` (the one of ``shape`` first), if any."""
    mask = find_object(image, colour, shape)
    return None if mask is None else classify_shape(mask)[0]


def test_the_shipped_generator_draws_the_asked_objects(shipped: Generator) -> None:
    """A regression test of the shipped weights: the asked objects appear, by colour and
    shape (bench/quality.py measures it on 300 prompts: 0.937)."""
    prompts = ["a red circle next to a blue square", "a green triangle", "a yellow star",
               "a purple square and a red star"]  # fmt: skip
    spec = BatchSpec("txt2img", 64, 64, steps=25, guidance_scale=7.5, sampler="dpmpp_2m")
    results = shipped.generate(spec, [Sample(p, seed=3) for p in prompts])
    drawn = [
        (colour, shape, drawn_shape(np.asarray(result.image), colour, shape))
        for prompt, result in zip(prompts, results, strict=True)
        for colour, shape in asked_objects(prompt)
    ]
    assert sum(shape == got for _, shape, got in drawn) >= 5, drawn


def test_make_demo_draws_both_asked_objects(shipped: Generator) -> None:
    """`make demo`'s prompt at the demo's seed (7, one image: sample seed 7) and steps."""
    prompt = "a red circle next to a blue square"
    spec = BatchSpec("txt2img", 64, 64, steps=25, guidance_scale=7.5, sampler="dpmpp_2m")
    [result] = shipped.generate(spec, [Sample(prompt, seed=7)])
    image = np.asarray(result.image)
    assert [drawn_shape(image, c, s) for c, s in asked_objects(prompt)] == ["circle", "square"]


def test_the_toy_stage_refuses_sizes_its_models_never_saw(
    shipped: Generator, tmp_path: Path
) -> None:
    """128x128 ends in a dead letter (``unsupported_size``) before any generation; the
    batch's 64x64 request is drawn as usual."""
    settings = Settings(models="toy", blob_url=str(tmp_path / "blobs"))
    stage = GenStage(settings, generator=shipped)
    progress: list[int | None] = []
    ctx = StageContext(
        blob=LocalBlobStore(tmp_path / "blobs"),
        topics=Topics("t"),
        settings=settings,
        emit=lambda _output, item: progress.append(item),
    )
    base = {"prompt": "a red circle", "steps": 2, "seed": 5}
    events = [
        PromptEvent(id="big", width=128, height=128, **base),
        PromptEvent(id="native", width=64, height=64, **base),
    ]
    refused, drawn = stage.handle(events, ctx)
    assert isinstance(refused, PermanentError)
    assert refused.error_type == "unsupported_size"
    assert str(refused) == (
        "the toy profile draws 64x64 images only (its models were trained at that size): "
        "send width=64 height=64"
    )
    assert isinstance(drawn, list) and progress and 0 not in progress  # never generated
    [ready] = [o.event for o in drawn if isinstance(o, Output)]
    assert isinstance(ready, ImageReadyEvent) and ready.id == "native"
    assert decode_image(ctx.blob.get(ready.image), max_pixels=64 * 64).size == (64, 64)


def test_training_is_reproducible(tmp_path: Path, restore_threads) -> None:
    """The same recipe twice gives the same weights, bit for bit (the shipped weights'
    claim, at smoke size)."""
    cfg = TrainConfig(
        scenes=8, threads=1, vae_steps=2, vae_batch=4, unet_steps=2, batch=4, warmup=1,
        log_every=1,
    )  # fmt: skip
    first = train(tmp_path / "a", cfg)
    second = train(tmp_path / "b", cfg)
    for name, module in (("unet", first.unet), ("vae", first.vae), ("text", first.text_encoder)):
        other = dict(getattr(second, "text_encoder" if name == "text" else name).named_parameters())
        for key, value in module.named_parameters():
            assert torch.equal(value, other[key]), f"{name}.{key} differs"


def test_recipe_flags_parse_booleans_and_keep_unset_defaults(tmp_path: Path) -> None:
    seen: list[tuple[Path, TrainConfig]] = []
    argv = ["--out", str(tmp_path), "--train-text-encoder", "false", "--unet-steps", "7"]
    recipe_main(argv, None, TrainConfig, lambda out, cfg: seen.append((out, cfg)), "out")
    [(out, cfg)] = seen
    assert out == tmp_path and cfg.unet_steps == 7 and cfg.train_text_encoder is False
    assert cfg.text_time_embedding is TrainConfig().text_time_embedding  # not given: default
    with pytest.raises(SystemExit):  # argparse reports "expected true or false" and exits 2
        recipe_main([*argv[:2], "--text-time-embedding", "maybe"], None, TrainConfig, print, "o")
