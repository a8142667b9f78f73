"""The shipped toy weights are the files docs/toy.md records (same bytes, by sha256), and
each recorded recipe is what the training script saved beside its weights."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genseg.cli import app
from toy.depth_model import DepthTrainConfig
from toy.gen_model import TrainConfig
from toy.scene_model import SceneTrainConfig
from toy.scene_weights import DEPTH_DIR, SCENE_SD_DIR
from toy.weights import SD_DIR

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "toy" / "weights"
DOC = ROOT / "docs" / "toy.md"
#: A row of the hash table in docs/toy.md: | `toy/weights/<file>` | `<sha256>` | ...
ROW = re.compile(r"^\|\s*`(toy/weights/[^`]+)`\s*\|\s*`([0-9a-f]{64})`\s*\|", re.MULTILINE)


def recorded() -> dict[str, str]:
    """Path (from the repository root) -> sha256, every row of the hash table."""
    rows = ROW.findall(DOC.read_text(encoding="utf-8"))
    table = dict(rows)
    assert len(table) == len(rows), "a file is recorded twice"
    return table


def shipped() -> set[str]:
    """Every weight, config and tokenizer file under toy/weights (not the package's code)."""
    files = (p for p in WEIGHTS.rglob("*") if p.is_file())
    return {
        str(p.relative_to(ROOT))
        for p in files
        if p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    }


def test_every_shipped_file_is_recorded_and_every_record_is_shipped() -> None:
    assert shipped() == set(recorded()), "docs/toy.md's hash table and toy/weights differ"


@pytest.mark.parametrize("name", sorted(recorded()))
def test_shipped_file_matches_its_recorded_hash(name: str) -> None:
    digest = hashlib.sha256((ROOT / name).read_bytes()).hexdigest()
    assert digest == recorded()[name], f"{name} is not the file docs/toy.md records"


def test_the_models_were_trained_with_the_default_recipes() -> None:
    """Each ``train_config.json`` is what its script (and so ``genseg train-toy``) runs by
    default, and no world was read from outside the repository."""
    depth = json.loads((DEPTH_DIR / "train_config.json").read_text(encoding="utf-8"))
    assert depth["recipe"] == asdict(DepthTrainConfig())
    gen = json.loads((SD_DIR / "train_config.json").read_text(encoding="utf-8"))
    assert gen == asdict(TrainConfig()) and not gen["world_cache"]
    scene = json.loads((SCENE_SD_DIR / "train_config.json").read_text(encoding="utf-8"))
    assert scene == asdict(SceneTrainConfig())


def test_train_toy_makes_every_shipped_file(tmp_path: Path) -> None:
    """``genseg train-toy --quick`` (every recipe for a few steps) writes the same set of
    files as toy/weights holds: what ships is what the command makes."""
    out = tmp_path / "weights"
    result = CliRunner().invoke(app, ["train-toy", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    made = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {str(Path(name).relative_to("toy/weights")) for name in shipped()} == made
    assert "4/4" in result.output and "trained in" in result.output
