"""The layers of docs/design-notes.md, checked on every import of every product module.

schemas <- plumbing <- producers, consumers <- stages (gen, seg, scene) <- toy <- genseg.
A module may import from its own layer and the layers below, never from above, and
lazy imports inside functions count too. Stages do not import one another, and no
stage knows the toy profile (it plugs in from outside, through entry points).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Package -> layer. Equal numbers may import each other.
LAYERS: dict[str, float] = {
    "schemas": 0,
    "plumbing": 1,
    "producers": 2,
    "consumers": 2,
    "gen_worker": 3,
    "seg_worker": 3,
    "scene_worker": 3,
    "webhook_worker": 3,
    "toy": 3.5,  # a model-profile plug-in: may use the stages' code, which never imports it
    "genseg": 4,
}
STAGES = {"gen_worker", "seg_worker", "scene_worker", "webhook_worker"}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package of ours, line) of every import in ``path``, lazy ones too."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in LAYERS:
                found.add((top, node.lineno))
    return found


def product_modules() -> list[Path]:
    return sorted(p for package in LAYERS for p in (ROOT / package).rglob("*.py"))


def violations(package: str, path: Path) -> list[str]:
    """What ``path``, a module of ``package``, imports against the rules."""
    out = []
    for imported, line in sorted(imported_packages(path)):
        where = f"{path.name}:{line} imports {imported}"
        if LAYERS[imported] > LAYERS[package]:
            out.append(f"{where}, a layer above {package}")
        elif package in STAGES and imported in STAGES and imported != package:
            out.append(f"{where}: stages do not import one another")
    return out


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(LAYERS), "a new package needs its layer here and in design-notes"


@pytest.mark.parametrize("package", list(LAYERS))
def test_no_module_imports_from_a_layer_above(package: str) -> None:
    found = [v for path in (ROOT / package).rglob("*.py") for v in violations(package, path)]
    assert not found, "\n".join(found)


def test_the_check_catches_upward_and_sideways_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import schemas\nfrom consumers.stage import Stage\nimport gen_worker.generate\n"
        "def f():\n    from genseg.cli import app\n    import toy.world\n"
    )
    found = violations("seg_worker", bad)
    assert len(found) == 3, found
    assert any("genseg, a layer above" in v for v in found)
    assert any("toy, a layer above" in v for v in found)
    assert any("stages do not import one another" in v for v in found)


def test_product_modules_stay_small() -> None:
    """No product module over about 500 lines: split it by job instead."""
    big = {
        str(p.relative_to(ROOT)): n
        for p in product_modules()
        if (n := len(p.read_text().splitlines())) > 520
    }
    assert not big, big
