"""``genseg demo --scene``: four views in one generator batch, their depth maps, .glb files,
masks and assets, the scene's contact sheet and its one scene-ready event (tiny, 64 px)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from genseg.cli import app
from genseg.demo import DemoRun
from genseg.scene_demo import run_scene_demo, scene_prompt
from plumbing.mesh import load_glb
from plumbing.settings import Settings
from scene_worker.merge import read_scene_objects
from schemas import ImageReadyEvent, SceneOptions, SceneReadyEvent
from seg_worker.depth import decode_depth_png
from toy.scene_weights import SCENE_SD_DIR

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a PROMPT, or --scene"),
        (["a cup", "--scene", "a room"], "give a PROMPT, or --scene"),
        (["--scene", "a room", "--views", "0,left"], "comma-separated degrees"),
        (["--scene", "a room", "--views", "0,0"], "distinct angles"),
    ],
)
def test_demo_arguments_are_checked_before_anything_starts(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["demo", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_the_scene_prompt_names_every_target() -> None:
    assert scene_prompt("modern living room", ["sofa", "coffee table"]) == (
        "modern living room, with a sofa and a coffee table"
    )
    assert scene_prompt("a sofa by the window", ["Sofa"]) == "a sofa by the window"


async def test_scene_demo(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    torch.set_num_threads(2)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    out = tmp_path / "out"
    run = DemoRun.of(
        settings, out, size=64, steps=2, console=Console(file=io.StringIO()),
        tracer_provider=provider,
    )  # fmt: skip
    result = await run_scene_demo(
        "modern living room", [0, 45, 90, 135], ["sofa", "coffee table"], run
    )
    # The four views shared one generator batch (its span links the four requests).
    batches = [s for s in exporter.get_finished_spans() if s.name == "batch gen"]
    assert [s.attributes["genseg.batch.size"] for s in batches] == [4]
    assert len(batches[0].links) == 4

    scene = result.scene
    assert [v.view for v in scene.views] == ["0", "45", "90", "135"]
    assert [v.id for v in scene.views] == [f"{result.scene_id}.view-{a}" for a in (0, 45, 90, 135)]
    assert SceneReadyEvent.model_validate_json((out / "scene.json").read_text()) == scene

    events = json.loads((out / "events.json").read_text())
    for view in scene.views:
        image_event = ImageReadyEvent.model_validate(events["images"][view.id])
        assert image_event.scene == SceneOptions(
            scene_id=result.scene_id,
            view=view.view,
            views_total=4,
            angle=float(view.view),
            outputs=["depth", "mesh"],
        )
        assert image_event.params.prompt == (
            f"modern living room, with a sofa and a coffee table, view from {view.view} degrees"
        )
        folder = out / f"view-{view.view}"
        depth = Image.open(folder / "depth.png")
        assert depth.mode == "I;16" and depth.size == (64, 64)
        glb = load_glb((folder / "view.glb").read_bytes())
        assert len(glb.geometry) == 1 + len(view.objects)
        assets = sorted(folder.glob("asset-*.png"))
        assert len(assets) == len(view.objects) == len(sorted(folder.glob("mask-*.png")))
        for path in assets:
            assert Image.open(path).mode == "RGBA"
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape[0] > 4 * 256, "one row per view"
    assert scene.mesh is None and not (out / "scene.glb").exists(), "relative depth: no merge"


async def test_toy_scene_demo_merges_the_scene_in_metres(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the toy profile the views are drawn by the scene generator, so they differ with
    the angle; the depth model is metric, so the scene stage merges the views: the
    scene-ready event references the merged .glb, which the demo saves and draws."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    torch.set_num_threads(2)
    out = tmp_path / "out"
    toy = settings.model_copy(update={"models": "toy"})
    run = DemoRun.of(toy, out, console=Console(file=io.StringIO()))
    prompt = "a red cube next to a blue sphere"
    result = await run_scene_demo(prompt, [0, 90], ["red cube"], run)
    events = json.loads((out / "events.json").read_text())
    for view in result.scene.views:
        assert events["images"][view.id]["model"] == str(SCENE_SD_DIR)
    first, second = (np.asarray(Image.open(out / f"view-{v}" / "image.png")) for v in ("0", "90"))
    assert np.abs(first.astype(int) - second).mean() > 5, "the views differ with the angle"
    assert result.scene.mesh is not None
    assert result.scene.mesh.media_type == "model/gltf-binary"
    for view in ("0", "90"):
        depth = decode_depth_png((out / f"view-{view}" / "depth.png").read_bytes())
        assert depth.units == "metres"
    merged = (out / "scene.glb").read_bytes()
    labels = [o.label for o in read_scene_objects(merged)]
    assert len(labels) == len(set(labels)), "each object once"
