"""``genseg demo``: the whole pipeline in one process, through the real command."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from genseg.cli import app


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
