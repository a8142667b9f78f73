"""Model revisions: every image-ready and asset-ready event names the exact weights that
made it (plumbing.revisions), and a rolling model update loses nothing.

The rolling update runs real worker processes (``genseg worker gen|seg``) on the real
broker: a generator on revision A (a tiny model saved to a directory and loaded as
``pretrained``), then one on revision B (other weights), the first stopped with SIGTERM
while the stream goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
import torch

from gen_worker.architectures import build_tiny_pipeline
from plumbing.kafka import ensure_topics
from plumbing.revisions import file_revision, revision_of
from plumbing.settings import Settings
from schemas import PromptEvent, SegmentationOptions
from tests.rel_utils import Ledger, WorkerProcess, stop_all, worker_env
from tests.test_rel_workers import publish


def _save_tiny(directory: Path, *, shift: float = 0.0) -> Path:
    """The tiny pipeline saved as a diffusers directory; ``shift`` changes its UNet."""
    pipe = build_tiny_pipeline()
    if shift:
        with torch.no_grad():
            for parameter in pipe.unet.parameters():
                parameter.add_(shift)
    pipe.save_pretrained(directory)
    return directory


def test_a_local_checkpoint_is_named_by_the_hash_of_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = _save_tiny(tmp_path / "a")
    b = _save_tiny(tmp_path / "b", shift=1e-3)
    rev_a, rev_b = revision_of(str(a)), revision_of(str(b))
    assert rev_a.startswith("sha256:") and rev_a != rev_b
    assert revision_of(str(_save_tiny(tmp_path / "a2"))) == rev_a, "same weights, same name"
    config = a / "unet" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert revision_of(str(a)) == rev_a, "configs are not weights"
    weights = next((a / "unet").glob("*.safetensors"))
    assert file_revision(weights) == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # one byte of another weight
    assert revision_of(str(a)) != rev_a, "cached by path, size and mtime: a change is seen"
    assert (tmp_path / "cache" / "genseg" / "weight-hashes.json").is_file()


def test_hub_ids_and_urls_without_a_local_copy_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert revision_of("nobody/no-such-model") == "hub:nobody/no-such-model"
    url = "https://example.invalid/sam_vit_b_01ec64.pth"
    assert revision_of(url) == f"url:{url}"


def _prompt(n: int) -> PromptEvent:
    return PromptEvent(
        id=f"roll-{n:03d}", prompt=f"a cup on a table, photo {n}", targets=["cup"],
        width=64, height=64, steps=6, seed=n,
        segmentation=SegmentationOptions(min_confidence=0.0),
    )  # fmt: skip


async def test_a_rolling_model_update_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    rev = {
        "a": revision_of(str(_save_tiny(tmp_path / "sd-a"))),
        "b": revision_of(str(_save_tiny(tmp_path / "sd-b", shift=1e-3))),
    }
    assert rev["a"] != rev["b"]
    await ensure_topics(settings, partitions=4)
    env = worker_env(settings, XDG_CACHE_HOME=str(tmp_path / "cache"))
    gens = {
        name: WorkerProcess(
            "gen", {**env, "GENSEG_MODELS": "pretrained", "SD_MODEL": str(tmp_path / f"sd-{name}")},
            tmp_path, name=f"gen-{name}",
        )
        for name in ("a", "b")
    }  # fmt: skip
    seg = WorkerProcess("seg", env, tmp_path)
    first, second = [_prompt(n) for n in range(16)], [_prompt(n) for n in range(16, 32)]
    ids = [p.id for p in first + second]
    try:
        gens["a"].start()
        seg.start()
        await asyncio.gather(gens["a"].wait_assigned(), seg.wait_assigned())
        async with Ledger(settings) as ledger:
            await publish(settings, first)
            await ledger.until(lambda: ledger.distinct_images() >= 2, timeout=180)
            gens["b"].start()  # the new revision joins the group...
            await gens["b"].wait_logged("stage gen assigned [", timeout=180)
            stopped = await asyncio.to_thread(gens["a"].stop)
            assert stopped == 0, "the old one drains and leaves on SIGTERM"
            await publish(settings, second)  # ... and the stream goes on
            await ledger.until_done(ids, timeout=300)
        verdict = ledger.verdict(ids)
        verdict.assert_exactly_once()
        images = {(e["id"], e["image_index"]): e for e in ledger.values("images")}
        made_by = {key: e["model_revision"] for key, e in images.items()}
        assert set(made_by.values()) == {rev["a"], rev["b"]}, "each revision made some"
        assert {made_by[(i, 0)] for i in (p.id for p in second)} == {rev["b"]}
        for asset in ledger.values("assets"):
            key = (asset["id"], asset["image_index"])
            assert asset["model_revision"] == made_by[key], "the asset names its image's maker"
            assert asset["segmenter_revision"] == "seed:0"
            assert asset["image"]["sha256"] == images[key]["image"]["sha256"]
    finally:
        stop_all([*gens.values(), seg])
