"""Model profiles: the built-ins live in the workers, the others plug in through entry points.

The toy profile is found through the entry points pyproject.toml declares (the package
is installed in editable mode); other plug-ins are declared by a distribution written
to a temporary directory on ``sys.path``, which ``importlib.metadata`` reads like any
installed one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from gen_worker import registry
from gen_worker.profiles import BUILTIN_PROFILES as GEN_BUILTINS
from gen_worker.profiles import GenModels, RuntimeOptions, gen_profile, known_profiles
from plumbing.settings import Settings
from seg_worker import profiles as seg
from seg_worker.config import SegConfig
from seg_worker.depth import ARCHS as DEPTH_ARCHS
from seg_worker.depth import depth_model_of, load_depth
from toy import profiles as toy
from toy.weights import SAM_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
KNOWN = "tiny, random, pretrained, toy"


def test_toy_is_declared_for_both_workers() -> None:
    """pyproject.toml's entry points, as the installed metadata reports them."""
    for group, value in (
        (registry.ENTRY_POINT_GROUP, "toy.profiles:GEN_PROFILE"),
        (seg.ENTRY_POINT_GROUP, "toy.profiles:SEG_PROFILE"),
    ):
        assert [ep.value for ep in entry_points(group=group) if ep.name == "toy"] == [value]


def test_the_registries_find_the_toy_plugin() -> None:
    assert known_profiles() == ["tiny", "random", "pretrained", "toy"]
    assert seg.known_profiles() == ["tiny", "random", "pretrained", "toy"]
    assert gen_profile("toy") is toy.GEN_PROFILE
    assert gen_profile("toy").native_size == (64, 64)
    assert all(gen_profile(name).native_size is None for name in GEN_BUILTINS)
    found = seg.seg_profile("toy")
    assert found is toy.SEG_PROFILE
    assert found.arch is toy.TOY_SAM_ARCH and found.default_checkpoint == str(SAM_WEIGHTS)
    assert seg.profile_arch("toy", "vit_h") == "toy"  # its own architecture, not SAM_MODEL
    assert seg.profile_arch("random", "vit_b") == "vit_b"


def test_the_toy_plugin_is_imported_only_when_asked_for() -> None:
    """Listing profiles reads metadata only; resolving ``toy`` imports toy.profiles."""
    script = textwrap.dedent(
        """
        import sys
        from gen_worker.profiles import gen_profile, known_profiles
        known_profiles()
        before = "toy.profiles" in sys.modules
        gen_profile("toy")
        print(before, "toy.profiles" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_profile_settings_of_the_segmenter() -> None:
    assert SegConfig.for_profile("toy") == SegConfig(
        auto_points_per_side=16, auto_stability_thresh=0.92
    )
    assert SegConfig.for_profile("tiny") == SegConfig(
        auto_points_per_side=4, auto_stability_thresh=0.0
    )
    assert SegConfig.for_profile("random") == SegConfig()
    assert SegConfig.for_profile("toy", crop_retry=False).crop_retry is False
    # The toy profile runs its own trained depth model (metric), the tiny one its random one.
    assert load_depth("toy", depth_model_of(Settings(models="toy"))).units == "metres"
    hidden = load_depth("tiny", "unused").model.config.backbone_config.hidden_size
    assert hidden == DEPTH_ARCHS["tiny"].hidden_size


def test_an_unknown_profile_names_the_known_ones() -> None:
    class Unknown:
        models = "huge"
        device = "cpu"

    message = f"unknown model profile 'huge': expected one of {KNOWN}$"
    for attempt in (
        lambda: gen_profile("huge"),
        lambda: GenModels.from_settings(Unknown(), RuntimeOptions(device="cpu")),
        lambda: seg.seg_profile("huge"),
        lambda: seg.load_sam("huge", "vit_b"),
        lambda: SegConfig.for_profile("huge"),
        lambda: load_depth("huge", "unused"),
    ):
        with pytest.raises(ValueError, match=message):
            attempt()


def declare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry_points_txt: str) -> None:
    """Install (on ``sys.path``) a distribution that declares ``entry_points_txt``."""
    dist = tmp_path / "plugin_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points_txt))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_plugin_cannot_replace_a_builtin_and_must_be_a_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    declare(
        tmp_path,
        monkeypatch,
        """
        [genseg.gen_profiles]
        tiny = toy.profiles:GEN_PROFILE
        notaprofile = toy.world:WorldConfig
        misnamed = toy.profiles:GEN_PROFILE

        [genseg.seg_profiles]
        toy = toy.profiles:SEG_PROFILE
        """,
    )
    assert known_profiles() == ["tiny", "random", "pretrained", "misnamed", "notaprofile", "toy"]
    assert gen_profile("tiny") is GEN_BUILTINS["tiny"]
    with pytest.raises(ValueError, match="is not a GenProfile named 'notaprofile'"):
        gen_profile("notaprofile")
    with pytest.raises(ValueError, match="is not a GenProfile named 'misnamed'"):
        gen_profile("misnamed")
    with pytest.raises(ValueError, match="segmenter profile 'toy' is declared more than once"):
        seg.seg_profile("toy")
