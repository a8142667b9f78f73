"""The quality benchmark on five prompts (the CI smoke size), with the shipped toy weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gen_worker.generate import BatchSpec, Generator, Sample
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.settings import Settings
from toy.quality import (
    GenParams,
    Mean,
    caption_sensitivity,
    duplicate_pairs,
    eval_prompts,
    generate,
)
from toy.world import EVAL_SEED_BASE, make_scene

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


def test_eval_prompts_are_fixed_and_apart_from_training() -> None:
    prompts = eval_prompts(120)
    assert prompts == eval_prompts(120)
    assert all(p.seed >= EVAL_SEED_BASE for p in prompts)
    for p in prompts[:20]:
        scene = make_scene(p.seed)
        assert p.caption == scene.caption
        assert p.target in {o.name for o in scene.objects}
    assert len({p.caption for p in prompts}) > 100


@pytest.fixture
def bench_main():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_quality_bench_smoke(bench_main, capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_main(["--prompts", "5", "--batch", "5"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert result["bench"] == "quality" and result["prompts"] == 5
    for mode in ("attention", "auto", "oracle"):
        for key in ("mean_iou", "success_rate", "no_match_rate"):
            assert 0.0 <= result[f"{mode}_{key}"] <= 1.0
    # The shipped models: the asked colours are drawn and the heat maps find them.
    assert result["colour_found_rate"] >= 0.8
    assert result["heat_peak_inside_rate"] >= 0.6
    # Attention over all targets (not generated: 0) and over the generated ones, each
    # with its count and confidence interval; no mode returns a duplicate.
    assert result["attention_all_n"] == 5
    assert result["attention_drawn_n"] == result["generated"] <= 5
    assert 0.0 <= result["attention_all_miou"] <= 1.0
    assert result["duplicate_pairs"] == 0
    # The shipped VAE keeps the shapes through its round trip (1.000 on 200 scenes).
    assert result["vae_shape_ceiling"] >= 0.95
    # ... and the generator draws most asked objects (0.937 of 300 prompts).
    assert result["generated"] >= 4


def test_each_prompt_has_its_own_seed_whatever_the_batch() -> None:
    """An image depends on its prompt only: the same pixels at batch 1 and at batch 3,
    and those of a direct call with the prompt's scene seed."""
    models = GenModels.from_settings(Settings(models="toy"), RuntimeOptions(device="cpu"))
    generator = Generator(models)
    prompts = eval_prompts(3)
    params = {"steps": 2, "guidance_scale": 7.5, "sampler": "dpmpp_2m", "size": 64}
    one = generate(generator, prompts, GenParams(**params, batch=1))
    three = generate(generator, prompts, GenParams(**params, batch=3))
    spec = BatchSpec("txt2img", 64, 64, steps=2, guidance_scale=7.5, sampler="dpmpp_2m")
    [direct] = generator.generate(spec, [Sample(prompts[2].caption, seed=prompts[2].seed)])
    pixels = [[np.asarray(r.image) for r in rs] for rs in (one, three)]
    assert all(np.array_equal(a, b) for a, b in zip(*pixels, strict=True))
    assert np.array_equal(pixels[0][2], np.asarray(direct.image))


def test_caption_sensitivity_compares_true_swapped_and_empty_captions() -> None:
    models = GenModels.from_settings(Settings(models="toy"), RuntimeOptions(device="cpu"))
    probe = caption_sensitivity(models.txt2img, count=8, timesteps=(500, 900))
    assert list(probe) == [500, 900]
    for losses in probe.values():
        assert set(losses) == {"right", "swapped", "empty"}
        # The shipped denoiser reads its captions: the empty one costs, and so does one
        # that names the wrong shapes.
        assert losses["empty"] > losses["right"]
        assert losses["swapped"] > losses["right"]


def test_duplicate_pairs_and_confidence_intervals() -> None:
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = a.copy()
    b[5] = True  # IoU 5/6 with a
    c = np.zeros((10, 10), bool)
    c[8:] = True
    assert duplicate_pairs([a, b, c]) == 1
    assert duplicate_pairs([a, c]) == 0
    mean = Mean.of([0.0, 1.0, 1.0, 0.0])
    assert (mean.value, mean.n) == (0.5, 4)
    assert mean.ci95 == pytest.approx(1.96 * np.std([0, 1, 1, 0], ddof=1) / 2)
