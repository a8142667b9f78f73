"""The toy scene generator: its tokenizer keeps the view, its training loop, the gen
stage drawing scene views with it (and everything else with the flat generator), and the
scene bench at smoke size on what that loop saved.

Real diffusers/transformers classes throughout; training runs the real recipe for a
few steps only; the shipped weights load through the ``pretrained`` code path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from consumers.stage import StageContext
from gen_worker.generate import BatchSpec, Generator, Sample
from gen_worker.handler import GenStage
from gen_worker.profiles import GenModels, RuntimeOptions
from plumbing.blobstore import LocalBlobStore
from plumbing.settings import Settings
from schemas import ImageReadyEvent, PromptEvent, SceneOptions, Topics
from toy.scene_data import scene_data, training_seeds
from toy.scene_model import (
    SCENE_MAX_TOKENS,
    SCENE_WORDS,
    SceneTrainConfig,
    build_scene_models,
    scene_tokenizer,
)
from toy.train_scene import train
from toy.weights import SD_DIR
from toy.world3d import VIEWS, caption3d, held_out, make_scene3d, view_caption

ROOT = Path(__file__).resolve().parents[1]


def test_scene_words_are_one_token_and_the_longest_prompt_keeps_its_view() -> None:
    tokenizer = scene_tokenizer()
    for word in SCENE_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = view_caption(
        caption3d([("purple", "cylinder"), ("yellow", "cylinder"), ("green", "cylinder")]), 135
    )
    ids = tokenizer(longest, truncation=True, max_length=SCENE_MAX_TOKENS).input_ids
    assert ids[-1] == tokenizer.eos_token_id, "cut off"
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("view from 1 3 5 degrees")


def test_training_rows_name_each_solid_in_its_view() -> None:
    """Each row's solid tokens point at that solid, whose mask cells are its view's."""
    tokenizer = scene_tokenizer()
    scene = make_scene3d(training_seeds(1)[0])
    data = scene_data([scene], tokenizer)
    assert len(data.images) == len(VIEWS)
    for row, view in enumerate(scene.views):
        tokens = tokenizer.convert_ids_to_tokens(data.ids[row].tolist())
        for k, solid in enumerate(scene.solids):
            named = [tokens[t] for t in np.flatnonzero(data.token_object[row].numpy() == k)]
            assert named == [f"{solid.colour}</w>", f"{solid.shape}</w>"]
            cells = view.masks[k].reshape(16, 4, 16, 4).mean(axis=(1, 3))
            assert np.allclose(data.masks[row, k].numpy(), cells)
    assert all(
        not held_out([(s.colour, s.shape) for s in make_scene3d(seed, views=()).solids])
        for seed in training_seeds(40)
    )


def test_training_runs_and_saves_a_loadable_pipeline(tmp_path: Path, restore_threads) -> None:
    # fp32: the flat recipe's bf16 steps are tested in tests/test_toy_gen.py.
    cfg = SceneTrainConfig(
        scenes=4, threads=1, vae_steps=2, vae_batch=4, unet_steps=3, batch=4, warmup=1,
        log_every=1, precision="fp32",
    )  # fmt: skip
    out = tmp_path / "scene_sd"
    pipe = train(out, cfg)
    fresh_unet = build_scene_models(scene_tokenizer(), cfg)[2]
    trained = dict(pipe.unet.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in fresh_unet.named_parameters())
    assert (out / "model_index.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["scenes"] == 4

    models = GenModels.from_settings(
        Settings(models="toy", toy_sd_model=str(out)), RuntimeOptions(device="cpu")
    )
    spec = BatchSpec("txt2img", 64, 64, steps=2, guidance_scale=7.5, sampler="dpmpp_2m")
    prompt = "a red cube and a blue sphere, view from 135 degrees"
    [result] = Generator(models).generate(spec, [Sample(prompt, seed=1, targets=("blue sphere",))])
    assert result.image.size == (64, 64)
    assert result.heatmaps["blue sphere"].shape == (16, 16)

    # The gen stage of the toy profile draws scene views with it, other requests (and a
    # scene view with TOY_SCENE_SD_MODEL=none) with the flat generator.
    view = SceneOptions(scene_id="s", view="45", views_total=4, angle=45)
    events = [
        PromptEvent(id="s.view-45", prompt=prompt, width=64, height=64, steps=2, scene=view),
        PromptEvent(id="flat", prompt=prompt, width=64, height=64, steps=2),
    ]
    for scene_model, expected in ((str(out), [str(out), str(SD_DIR)]), ("none", [str(SD_DIR)] * 2)):
        settings = Settings(models="toy", toy_scene_sd_model=scene_model, device="cpu")
        ctx = StageContext(blob=LocalBlobStore(tmp_path / "blobs"), topics=Topics("t"))
        results = GenStage(settings).handle(events, ctx)
        ready = [r[0].event for r in results if isinstance(r, list)]
        assert all(isinstance(e, ImageReadyEvent) for e in ready), results
        assert [e.model for e in ready] == expected
        assert len({e.model_revision for e in ready}) == len(set(expected))
    assert (
        GenModels.from_settings(
            Settings(models="toy", toy_scene_sd_model="none"), RuntimeOptions(device="cpu")
        ).scene
        is None
    )

    # bench/scene_quality.py at smoke size, on this pipeline and the shipped depth model.
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scene_quality.py"), "--sd", str(out),
         "--scenes", "2", "--depth-views", "8", "--steps", "4", "--threads", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    bench = json.loads(run.stdout.strip().splitlines()[-1])
    assert bench["bench"] == "scene_quality" and bench["scenes"] == 2
    assert bench["depth"]["random_layouts"]["views"] == 8
    assert bench["depth"]["random_layouts"]["abs_rel"] <= 0.10
    assert 0 <= bench["generated"]["found_in_3_of_4"]["mean"] <= 1
