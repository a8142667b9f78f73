"""The quality benchmark on five prompts (the CI smoke size), with the shipped toy weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from toy.quality import eval_prompts
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
