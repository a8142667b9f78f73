"""Gen worker parts below the handler: profiles, tokenizer, heat-map aggregation, OOM ladder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from consumers.stage import PermanentError
from gen_worker.architectures import build_tiny_pipeline, sd15_architecture
from gen_worker.attention import HeatmapAccumulator, find_token_span
from gen_worker.generate import BatchSpec, Generator, Sample, draft_size, effective_steps
from gen_worker.oom import run_with_oom_ladder
from gen_worker.profiles import GenModels, RuntimeOptions
from gen_worker.tokenizer import local_clip_tokenizer
from plumbing.images import encode_png
from plumbing.settings import Settings

SPEC = BatchSpec(
    mode="txt2img", width=64, height=64, steps=3, guidance_scale=7.5, sampler="dpmpp_2m"
)


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> GenModels:
    return GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))


# --- tokenizer and target spans --------------------------------------------------------------


def test_local_tokenizer_is_clip_shaped() -> None:
    tok = local_clip_tokenizer()
    ids = tok("A Coffee cup", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "coffee</w>", "cup</w>"]
    assert len(local_clip_tokenizer(49408)) == 49408


@pytest.mark.parametrize(
    ("prompt", "target", "expected"),
    [
        ("a coffee cup on a table", "coffee cup", [2, 3]),  # multi-token target
        ("a coffee cup on a table", "Cup", [3]),  # case-insensitive, like CLIP
        ("a zebra near a zebra", "zebra", [2, 3, 4, 5, 6, 12, 13, 14, 15, 16]),  # all occurrences
        ("a teacup", "cup", []),  # word boundaries: not inside another word
        ("a coffee cup", "dog", []),
        ("a coffee cup", "<|endoftext|>", []),  # special tokens (padding) are never targets
        ("a cup" + " and a cup" * 40, "cup", [2, *range(5, 76, 3)]),  # truncated to 77 tokens
    ],
)
def test_find_token_span(prompt: str, target: str, expected: list[int]) -> None:
    tok = local_clip_tokenizer()
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert find_token_span(tok, ids, target) == expected


# --- heat-map aggregation -------------------------------------------------------------------


def one_hot_probs(n: int, heads: int, hw: tuple[int, int], token: int, at: int) -> torch.Tensor:
    """Attention probabilities ``[n, heads, h*w, 77]``: uniform, except that position ``at``
    attends only to ``token``."""
    q = hw[0] * hw[1]
    probs = torch.full((n, heads, q, 77), 1 / 77)
    probs[:, :, at] = 0.0
    probs[:, :, at, token] = 1.0
    return probs


def test_accumulator_resizes_layers_and_averages() -> None:
    acc = HeatmapAccumulator()
    acc.start(batch=2, tokens=77, out_hw=(8, 12), device=torch.device("cpu"))
    acc.begin_pass((8, 12), cfg=True)
    acc.add(one_hot_probs(2, 4, (8, 12), token=3, at=0))  # full resolution, top-left
    acc.add(one_hot_probs(2, 4, (4, 6), token=3, at=5))  # half resolution, top-right
    means = acc.stop()
    assert means is not None and means.shape == (2, 77, 8, 12)
    heat = means[0, 3]
    assert heat[0, 0] > heat[4, 6] and heat[0, 11] > heat[4, 6]  # both layers contributed
    assert torch.allclose(means[0], means[1])
    assert acc.layer_hw(4 * 6) == (4, 6) and acc.layer_hw(2 * 3) == (2, 3)
    acc.begin_pass((9, 13), cfg=True)  # odd latent sizes round up per UNet level
    assert acc.layer_hw(5 * 7) == (5, 7)


def test_accumulator_adds_to_the_samples_of_the_current_call() -> None:
    acc = HeatmapAccumulator()
    acc.start(batch=3, tokens=77, out_hw=(4, 4), device=torch.device("cpu"))
    acc.begin_pass((4, 4), cfg=False)
    acc.samples = [2]  # a per-sample UNet call for sample 2
    acc.add(one_hot_probs(1, 2, (4, 4), token=7, at=15))
    means = acc.stop()
    assert means is not None
    assert means[2, 7, 3, 3] == 1.0 and means[0].abs().sum() == 0


# --- profiles --------------------------------------------------------------------------------


def test_tiny_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_tiny_pipeline(), build_tiny_pipeline()
    assert torch.equal(torch.rand(1), expected_next)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert build_tiny_pipeline(inpaint=True).unet.config.in_channels == 9
    assert a.vae_scale_factor == 8


def test_random_profile_is_full_size_sd15() -> None:
    """The ``random`` profile has SD 1.5's exact parameter counts (built on the meta device)."""
    arch = sd15_architecture()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)


def image_png(models: GenModels, spec: BatchSpec = SPEC, **sample: object) -> bytes:
    kw = {"prompt": "a coffee cup", "seed": 11, **sample}
    [result] = Generator(models).generate(spec, [Sample(**kw)])  # type: ignore[arg-type]
    return encode_png(result.image)


def test_pretrained_path_loads_a_saved_pipeline(tiny: GenModels, tmp_path: Path) -> None:
    """save_pretrained -> GENSEG_MODELS=pretrained: the same weights, the same image."""
    build_tiny_pipeline().save_pretrained(tmp_path / "sd")
    build_tiny_pipeline(inpaint=True).save_pretrained(tmp_path / "sd-inpaint")
    settings = Settings(
        models="pretrained",
        sd_model=str(tmp_path / "sd"),
        sd_inpaint_model=str(tmp_path / "sd-inpaint"),
    )
    loaded = GenModels.from_settings(settings, RuntimeOptions(device="cpu"))
    assert loaded.profile == "pretrained" and loaded.name == str(tmp_path / "sd")
    assert image_png(loaded) == image_png(tiny)
    assert loaded.inpaint.unet.config.in_channels == 9
    assert loaded.dtype == torch.float32  # the CPU path stays fp32


def test_unknown_profile_is_refused() -> None:
    class Fake:
        models = "huge"
        device = "cpu"

    with pytest.raises(ValueError, match="unknown model profile"):
        GenModels.from_settings(Fake(), RuntimeOptions(device="cpu"))


def test_tiny_images_are_identical_in_another_process(tiny: GenModels) -> None:
    """A gen worker in another process makes the same image for the same request."""
    script = textwrap.dedent(
        f"""
        import hashlib, sys, torch
        torch.set_num_threads({torch.get_num_threads()})
        from gen_worker.generate import BatchSpec, Generator, Sample
        from gen_worker.profiles import GenModels, RuntimeOptions
        from plumbing.images import encode_png
        from plumbing.settings import Settings
        models = GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))
        spec = BatchSpec(mode="txt2img", width=64, height=64, steps=3, guidance_scale=7.5,
                         sampler="dpmpp_2m")
        [r] = Generator(models).generate(spec, [Sample(prompt="a coffee cup", seed=11)])
        sys.stdout.write(hashlib.sha256(encode_png(r.image)).hexdigest())
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import hashlib

    assert out.stdout.strip() == hashlib.sha256(image_png(tiny)).hexdigest()


# --- generation helpers ----------------------------------------------------------------------


def test_draft_size_and_effective_steps() -> None:
    assert draft_size(512, 768, 0.5) == (256, 384)
    assert draft_size(64, 96, 0.5) == (64, 64)  # never below 64, never above the request
    assert draft_size(200, 200, 0.3) == (64, 64)
    assert effective_steps(25, 0.5) == 25
    assert effective_steps(1, 0.5) == 2  # diffusers would run int(1 * 0.5) = 0 steps


# --- the OOM ladder --------------------------------------------------------------------------


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")


def test_ladder_passes_through_when_memory_suffices() -> None:
    calls: list[tuple[list[int], bool]] = []

    def run(batch: list[int], low: bool) -> list[int]:
        calls.append((list(batch), low))
        return [x * 10 for x in batch]

    assert run_with_oom_ladder([1, 2, 3], run) == [10, 20, 30]
    assert calls == [([1, 2, 3], False)]
    assert run_with_oom_ladder([], run) == []


def test_ladder_halves_until_batches_fit() -> None:
    calls: list[tuple[list[int], bool]] = []

    def run(batch: list[int], low: bool) -> list[int]:
        calls.append((list(batch), low))
        if len(batch) > 2:
            raise oom()
        return [x * 10 for x in batch]

    assert run_with_oom_ladder([1, 2, 3, 4, 5, 6, 7], run) == [10, 20, 30, 40, 50, 60, 70]
    assert [c[0] for c in calls] == [
        [1, 2, 3, 4, 5, 6, 7],
        [1, 2, 3, 4],
        [1, 2],
        [3, 4],
        [5, 6, 7],
        [5, 6],
        [7],
    ]
    assert not any(low for _, low in calls)


def test_ladder_tries_low_memory_for_one_sample_then_gives_up_on_it_only() -> None:
    def run(batch: list[int], low: bool) -> list[int]:
        if len(batch) > 1 or (batch[0] == 2 and not low) or batch[0] == 3:
            raise oom()
        return [x * 10 for x in batch]

    out = run_with_oom_ladder([1, 2, 3], run)
    assert out[:2] == [10, 20]
    assert isinstance(out[2], PermanentError) and out[2].error_type == "out_of_memory"
    assert "Tried to allocate 3.00 GiB" in str(out[2])


def test_ladder_lets_other_errors_through() -> None:
    def run(batch: list[int], low: bool) -> list[int]:
        if len(batch) > 1:
            raise oom()
        raise ValueError("bad tensor")

    with pytest.raises(ValueError, match="bad tensor"):
        run_with_oom_ladder([1, 2], run)


def test_seeds_are_per_sample_generators(tiny: GenModels) -> None:
    """Two images of one request differ; the same seed twice gives the same image."""
    gen = Generator(tiny)
    a, b, c = gen.generate(
        SPEC,
        [Sample("a cup", seed=1), Sample("a cup", seed=2), Sample("a cup", seed=1)],
    )
    pa, pb, pc = (np.asarray(r.image) for r in (a, b, c))
    assert not np.array_equal(pa, pb) and np.array_equal(pa, pc)
