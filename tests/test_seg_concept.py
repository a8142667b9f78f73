"""SAM 3 and the text-concept modes (``concept``, ``attention+concept``).

SAM 3 is transformers' ``Sam3Model`` in the tiny configuration built in code, saved
with ``save_pretrained`` (model, image processor and the byte-level CLIP tokenizer)
and loaded back through the ``pretrained`` profile. Its random weights find arbitrary
"instances" with scores near 0.25: the tests check scores, counts, order, caching and
determinism, and pick thresholds between the scores the model gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.stage import PermanentError
from plumbing.images import encode_heatmap
from plumbing.settings import Settings
from schemas import PromptEvent, SegmentationOptions
from seg_worker.backend import Instance, SegBackend, UnsupportedMode
from seg_worker.concept import ConceptGroup, concept_candidates, heat_share
from seg_worker.finishing import DUPLICATE_IOU, Candidate, decode_rle, mask_iou, select_objects
from seg_worker.hf_configs import SAM3_TEXT_LENGTH, byte_clip_tokenizer, sam3_config
from seg_worker.hf_sam3 import Sam3Backend, build_sam3
from tests.test_seg_backends import Env, check_objects, run_pipeline
from tests.test_seg_stage import H, W

torch.set_num_threads(2)


def save_tiny_sam3(directory: Path, seed: int = 4) -> Path:
    model, processor = build_sam3("tiny", seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3-tiny-saved"))


@pytest.fixture
def sam3(tmp_path: Path, sam3_dir: Path) -> Env:
    return Env(tmp_path, models="pretrained", segmenter="sam3", sam3_model=str(sam3_dir))


def backend_of(env: Env) -> Sam3Backend:
    env.stage.setup()
    backend = env.stage.predictor
    assert isinstance(backend, Sam3Backend)
    return backend


def instances(env: Env, text: str, **limits: float) -> list[Instance]:
    backend = backend_of(env)
    emb = backend.embed((env.image_ref.sha256, 1.0, None), env.image)
    return backend.concept(
        emb,
        text,
        (H, W),
        min_score=limits.get("min_score", 0.0),
        max_instances=int(limits.get("max_instances", 100)),
    )


# --- building and loading ------------------------------------------------------------------


def test_tiny_sam3_is_seeded_and_loads_back_from_save_pretrained(sam3: Env, sam3_dir: Path) -> None:
    a, _ = build_sam3("tiny", seed=4)
    b, _ = build_sam3("tiny", seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c, _ = build_sam3("tiny", seed=5)
    assert not torch.equal(a.detr_decoder.query_embed.weight, c.detr_decoder.query_embed.weight)
    loaded = backend_of(sam3)
    assert isinstance(loaded, SegBackend) and loaded.side == 224
    for (name, pa), pb in zip(
        a.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert sam3.stage.segmenter_id == f"sam3:{sam3_dir.name}"
    assert loaded.processor.tokenizer("cup").input_ids == byte_clip_tokenizer()("cup").input_ids


def test_the_released_sam3_architecture_is_transformers_default() -> None:
    from transformers import Sam3Config, Sam3Model

    with torch.device("meta"):
        ours = Sam3Model(sam3_config(byte_clip_tokenizer(49408))).state_dict()
        theirs = Sam3Model(Sam3Config()).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sum(v.numel() for v in ours.values()) > 800e6


def test_the_byte_tokenizer_pads_and_truncates_to_sam3s_text_length() -> None:
    tokenizer = byte_clip_tokenizer()
    ids = tokenizer(
        ["red cup", "x" * 100], padding="max_length", truncation=True, max_length=SAM3_TEXT_LENGTH
    ).input_ids
    assert [len(i) for i in ids] == [SAM3_TEXT_LENGTH] * 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    unpadded = tokenizer("red cup").input_ids
    assert len(unpadded) == 8 and ids[0][:8] == unpadded and ids[0][8:] == [eos] * 24
    assert unpadded[0] == bos and all(i < bos for i in unpadded[1:-1])  # bytes: none unknown
    assert ids[1][-1] == eos and len(set(ids[1][1:-1])) == 1  # "x"s, cut to fit


# --- concept: instances with scores --------------------------------------------------------


def test_concept_returns_instances_with_scores(sam3: Env) -> None:
    found = instances(sam3, "cup")
    assert len(found) == 16  # the tiny detector's queries, none filtered
    scores = [i.score for i in found]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert all(i.mask.shape == (H, W) and i.mask.dtype == bool for i in found)
    assert [i.score for i in instances(sam3, "cup")] == scores  # deterministic
    assert [i.score for i in instances(sam3, "plate")] != scores  # the text matters
    cut = (scores[3] + scores[4]) / 2  # between the 4th and the 5th score
    assert [i.score for i in instances(sam3, "cup", min_score=cut)] == scores[:4]
    assert len(instances(sam3, "cup", max_instances=2)) == 2


def test_concept_mode_events_respect_min_confidence_and_max_objects(sam3: Env) -> None:
    """No heat map needed: an image-ready event without any (an upstream image)."""
    masks, assets = sam3.ok(
        sam3.event(["cup", "plate"], mode="concept", heat=False, max_objects=3, smooth_px=0)
    )
    # Every instance of both concepts, best first, less the same-label duplicates the
    # segmenter suppresses (mask IoU > 0.5; the tiny random model's instances overlap).
    candidates = [
        Candidate(text, i.score, i.mask) for text in ("cup", "plate") for i in instances(sam3, text)
    ]

    def expected(min_confidence: float, max_objects: int) -> list[tuple[float, str]]:
        kept = select_objects(
            candidates, min_confidence=min_confidence, max_objects=max_objects, smooth_px=0
        )
        return [(round(o.score, 6), o.label) for o in kept]

    best = expected(0.0, 3)
    assert len(masks.objects) == len(best) >= 2 and assets.status == "ok"
    assert {o.label for o in masks.objects} <= {"cup", "plate"}
    assert masks.segmenter == assets.segmenter and masks.segmenter.startswith("sam3:")
    check_objects(sam3, masks, assets)
    assert [(round(o.score, 6), o.label) for o in masks.objects] == best
    cut = (best[0][0] + best[1][0]) / 2
    masks, _ = sam3.ok(
        sam3.event(
            ["cup", "plate"], mode="concept", heat=False, min_confidence=cut, request_id="req-2"
        )
    )
    assert [(round(o.score, 6), o.label) for o in masks.objects] == expected(cut, 5)
    assert masks.objects and all(o.score >= cut for o in masks.objects)
    masks, assets = sam3.ok(
        sam3.event(["cup"], mode="concept", min_confidence=0.99, request_id="req-3")
    )
    assert masks.objects == [] and assets.status == "no_match"


def test_concept_masks_are_smoothed_like_the_other_modes(sam3: Env) -> None:
    (raw,) = instances(sam3, "cup", max_instances=1)
    rough, _ = sam3.ok(sam3.event(["cup"], mode="concept", max_objects=1, smooth_px=0))
    smooth, _ = sam3.ok(
        sam3.event(["cup"], mode="concept", max_objects=1, smooth_px=3, request_id="req-2")
    )
    np.testing.assert_array_equal(decode_rle(rough.objects[0].rle.model_dump()), raw.mask)
    assert rough.objects[0].rle != smooth.objects[0].rle


# --- attention+concept: the instance holding the heat --------------------------------------


def test_attention_plus_concept_picks_the_instance_with_the_most_heat(sam3: Env) -> None:
    found = instances(sam3, "cup")
    masks = [i.mask for i in found]
    # an instance that no other contains, and not the best-scored: the test must be able
    # to tell re-ranking from the score order
    pick = next(
        k
        for k in range(1, len(found))
        if masks[k].any()
        and all(
            heat_share(masks[k].astype(np.float32), m) < 0.95 for j, m in enumerate(masks) if j != k
        )
    )
    heat = masks[pick].astype(np.float32)  # the generator attended to exactly that object
    heat_ref = sam3.store.put("gen/heat-cup-pick.png", encode_heatmap(heat), "image/png")
    event = sam3.event(["cup"], mode="attention+concept", heat=False, max_objects=1, smooth_px=0)
    event = event.model_copy(update={"heatmaps": {"cup": heat_ref}})
    chosen, _ = sam3.ok(event)
    (obj,) = chosen.objects
    np.testing.assert_array_equal(decode_rle(obj.rle.model_dump()), masks[pick])
    assert abs(obj.score - found[pick].score) < 1e-6  # the score stays SAM 3's confidence
    plain, _ = sam3.ok(
        sam3.event(["cup"], mode="concept", max_objects=1, smooth_px=0, request_id="req-2")
    )
    assert abs(plain.objects[0].score - found[0].score) < 1e-6  # concept alone: by score


def test_attention_plus_concept_without_a_heat_map_is_plain_concept(sam3: Env) -> None:
    with_heat_mode, _ = sam3.ok(
        sam3.event(["cup"], mode="attention+concept", heat=False, max_objects=2)
    )
    plain, _ = sam3.ok(sam3.event(["cup"], mode="concept", max_objects=2, request_id="req-2"))
    assert [o.rle for o in with_heat_mode.objects] == [o.rle for o in plain.objects]


def test_heat_share_ranks_and_drops_instances() -> None:
    heat = np.zeros((4, 4), np.float32)
    heat[0, :2] = 1.0  # all the heat in the top-left pair of pixels
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    right = ~left
    half = np.zeros((4, 4), bool)
    half[0, 0] = True
    found = [Instance(0.9, right), Instance(0.3, half), Instance(0.2, left)]
    ranked = concept_candidates(ConceptGroup("cup", heat), found, min_heat=0.1)
    assert [c.rank for c in ranked] == [0.5, 1.0]  # "right" holds no heat: dropped
    objects = select_objects(ranked, min_confidence=0.0, max_objects=5, smooth_px=0)
    assert [o.score for o in objects] == [0.2, 0.3]  # most heat first, scores kept
    assert heat_share(np.zeros((4, 4), np.float32), left) == 0.0
    plain = concept_candidates(ConceptGroup("cup"), found, min_heat=0.1)
    assert [c.score for c in plain] == [0.9, 0.3, 0.2] and all(c.rank is None for c in plain)


# --- the embedding cache -------------------------------------------------------------------


def test_sam3_encodes_an_image_once_for_every_target_and_request(sam3: Env) -> None:
    backend = backend_of(sam3)
    calls = {"backbone": 0, "neck": 0}
    vision = backend.model.vision_encoder
    vision.backbone.register_forward_hook(
        lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1)
    )
    vision.neck.register_forward_hook(lambda *_: calls.__setitem__("neck", calls["neck"] + 1))
    sam3.ok(sam3.event(["cup", "plate"], mode="concept"))
    assert calls == {"backbone": 1, "neck": 1}  # two targets: one backbone and neck pass
    sam3.ok(sam3.event(["plate"], mode="concept", request_id="req-2"))
    assert calls["backbone"] == 1 and backend.encoder_images == 1 and backend.cache.hits >= 1


# --- modes SAM 3 does not serve here -------------------------------------------------------


@pytest.mark.parametrize("mode", ["attention", "auto"])
def test_prompt_modes_on_sam3_dead_letter_naming_the_setting(sam3: Env, mode: str) -> None:
    (result,) = sam3.handle(sam3.event(["cup"], mode=mode))
    assert isinstance(result, UnsupportedMode) and isinstance(result, PermanentError)
    assert result.error_type == "unsupported_mode"
    assert "GENSEG_SEGMENTER=sam or GENSEG_SEGMENTER=sam2" in str(result)


def test_tiny_profile_runs_sam3_with_a_segmenter_name(tmp_path: Path) -> None:
    env = Env(tmp_path, models="tiny", segmenter="sam3")
    masks, assets = env.ok(env.event(["cup"], mode="concept", max_objects=2))
    assert masks.segmenter == assets.segmenter == "sam3:tiny" and len(masks.objects) == 2


# --- end to end: the real CLI workers ------------------------------------------------------


@pytest.mark.timeout(420)
async def test_pipeline_end_to_end_with_sam3_concept(
    settings: Settings, tmp_path: Path, sam3_dir: Path
) -> None:
    prompt = PromptEvent(
        id="e2e-sam3",
        prompt="a red cup on a wooden table",
        targets=["cup"],
        width=64,
        height=64,
        steps=2,
        seed=5,
        segmentation=SegmentationOptions(mode="concept", min_confidence=0.0, max_objects=3),
    )
    seg_env = {
        "GENSEG_SEGMENTER": "sam3",
        "GENSEG_MODELS": "pretrained",
        "SAM3_MODEL": str(sam3_dir),
    }
    masks, assets = await run_pipeline(settings, tmp_path, seg_env, prompt)
    assert masks["segmenter"] == assets["segmenter"] == f"sam3:{sam3_dir.name}"
    assert assets["status"] == "ok" and 1 <= len(assets["assets"]) == len(masks["objects"]) <= 3
    scores = [o["score"] for o in masks["objects"]]
    assert scores == sorted(scores, reverse=True)
    assert all(o["label"] == "cup" and o["rle"]["size"] == [64, 64] for o in masks["objects"])
    found = [decode_rle(o["rle"]).astype(bool) for o in masks["objects"]]
    assert all(mask_iou(a, b) <= DUPLICATE_IOU for i, a in enumerate(found) for b in found[i + 1 :])
