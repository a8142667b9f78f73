"""``genseg demo``: the whole pipeline in one process, through the real command."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from genseg.cli import app
from plumbing.broker import free_port


def test_demo_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: "" for k in ("KAFKA_BOOTSTRAP_SERVERS", "GENSEG_BLOB_URL") if k in os.environ}
    result = CliRunner().invoke(
        app,
        ["demo", "a coffee cup on a table", "--target", "coffee cup", "--out", str(out),
         "--size", "64", "--steps", "2"],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "trace id" in result.output and "random weights" in result.output
    events = json.loads((out / "events.json").read_text())
    assert events["terminal"]["schema"] == "genseg.asset/v1"
    assert events["terminal"]["status"] == "ok"  # the tiny demo keeps every mask
    assets = sorted(out.glob("asset-*-coffee-cup.png"))
    masks = sorted(out.glob("mask-*-coffee-cup.png"))
    assert assets and len(assets) == len(masks) == len(events["terminal"]["assets"])
    assert Image.open(assets[0]).mode == "RGBA"
    assert Image.open(out / "image.png").size == (64, 64)
    assert (out / "heatmap-coffee-cup.png").is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 4 * 64 and sheet.height >= 256


def test_demo_without_target_warns_and_names_a_missing_broker() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}  # nothing listens there
    result = CliRunner().invoke(app, ["demo", "a coffee cup on a table"], env=env)
    assert result.exit_code == 1
    warning, failure, todo = result.stderr.strip().splitlines()
    assert "no --target: nothing will be cut out" in warning
    assert failure == f"no broker at {env['KAFKA_BOOTSTRAP_SERVERS']}"
    assert "genseg broker" in todo


def test_demo_says_which_targets_it_cannot_place(tmp_path: Path) -> None:
    # The tiny profile's tokenizer reads 77 tokens; an unknown word costs one per letter.
    prompt = "a red cup next to " + "xylophone " * 10 + "and a green apple"
    env = {k: "" for k in ("KAFKA_BOOTSTRAP_SERVERS", "GENSEG_BLOB_URL") if k in os.environ}
    result = CliRunner().invoke(
        app,
        ["demo", prompt, "-t", "cup", "-t", "apple", "-t", "zebra", "--out", str(tmp_path),
         "--size", "64", "--steps", "2"],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    before, after = result.stderr.strip().splitlines()
    assert before.startswith("'zebra' not in the prompt")
    assert "did not find 'apple', 'zebra'" in after and "'cup'" not in after


def make_demo_arguments() -> list[str]:
    """The arguments of ``genseg`` in the Makefile's ``demo`` recipe (what ``make demo``
    runs after installing)."""
    recipe = Path(__file__).resolve().parent.parent.joinpath("Makefile").read_text()
    line = next(line for line in recipe.splitlines() if "genseg demo" in line)
    return shlex.split(line.split("/genseg", 1)[1])


def test_make_demo_runs_the_toy_demo_and_cuts_out_the_asked_object(tmp_path: Path) -> None:
    arguments = make_demo_arguments()
    assert arguments[:1] == ["demo"] and "--models" in arguments
    out = tmp_path / "out"
    env = {k: "" for k in ("KAFKA_BOOTSTRAP_SERVERS", "GENSEG_BLOB_URL") if k in os.environ}
    result = CliRunner().invoke(app, [*arguments, "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    events = json.loads((out / "events.json").read_text())
    assert events["terminal"]["status"] == "ok", events["terminal"]
    target = arguments[arguments.index("--target") + 1]
    assert [a["label"] for a in events["terminal"]["assets"]][:1] == [target]
    assert (out / "contact_sheet.png").is_file()
