"""The generator's request policy (issue 8): structured prompts, content rules on
normalised text, reloads, per-tenant rate limits and tenant metrics, the image check."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from prometheus_client.parser import text_string_to_metric_families
from transformers import CLIPConfig, CLIPImageProcessor

from consumers.metrics import StageMetrics
from consumers.runtime import RuntimeConfig, StageRuntime
from consumers.stage import Output, PermanentError, StageContext
from gen_worker.generate import BatchSpec, Generator, Sample, SampleResult
from gen_worker.handler import GenStage
from gen_worker.policy import (
    Policy,
    PolicyError,
    PolicyStore,
    RateLimit,
    RateLimiter,
    normalize,
)
from gen_worker.profiles import GenModels, RuntimeOptions, build_random_components
from gen_worker.profiles import tiny_architecture as tiny_arch
from gen_worker.safety import SafetyChecker
from plumbing.blobstore import LocalBlobStore
from plumbing.settings import Settings
from producers.publisher import Publisher
from schemas import ImageReadyEvent, PromptEvent, Topics, parse_event
from tests.kafka_utils import TopicReader, eventually

TOPICS = Topics("t")
FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "commit_interval_ms": 50}

POLICY = """
max_prompt_chars = 120

[allow]
terms = ["Acme Valley"]

[rules.brands]
terms = ["acme", "Greg Rutkowski"]
patterns = { acme-corp = 'acme\\s*corp(oration)?' }

[rules.substrings]
terms = ["globex"]
whole_word = false
"""


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Iterator[None]:
    """Two threads at most: other suites share this machine's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.from_toml(POLICY)


class Clock:
    """A clock the test moves by hand (rate limits and reload intervals without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    """Replace ``path`` atomically, as config management does (a new inode: a new version)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- matching ---------------------------------------------------------------------------

#: Spellings of "acme" that must not slip through: case, full-width, homoglyphs, invisible
#: characters, accents, compatibility forms.
ACME_VARIANTS = [
    "ACME",
    "Acme",
    "ＡＣＭＥ",  # full-width capitals
    "ａｃｍｅ",  # full-width small letters
    "аcmе",  # Cyrillic а and е
    "АСМЕ",  # Cyrillic capitals
    "ΑCΜΕ",  # Greek Alpha, Mu, Epsilon
    "ac\u200dme",  # zero-width joiner
    "a\u200bc\u200cme",  # zero-width space and non-joiner
    "\ufeffac\u2060me",  # byte-order mark, word joiner
    "ac\u00adme",  # soft hyphen
    "ácmé",  # accents
    "a\u0301cme\u0308",  # combining marks
    "𝐚𝐜𝐦𝐞",  # mathematical bold
    "ᴀᴄᴍᴇ",  # small capitals
    "Ⓐⓒⓜⓔ",  # circled letters
]


@pytest.mark.parametrize("variant", ACME_VARIANTS)
def test_blocked_term_variants_are_refused(policy: Policy, variant: str) -> None:
    if variant not in ("ACME", "Acme"):
        assert variant.lower() != "acme", "the variant is not plain text in disguise"
    refusal = policy.check(f"a coffee mug by {variant}, studio light")
    assert refusal is not None, variant
    assert refusal.rule == "brands.acme"
    assert refusal.message == 'blocked term "acme" (rule brands.acme) in prompt'


@pytest.mark.parametrize(
    "prompt",
    [
        "a postcard of acmeville",  # whole word: "acmeville" is not "acme"
        "the acmes",  # nor a longer word
        "a hike in Acme Valley at dawn",  # allow-listed phrase
        "a hike in ＡＣＭＥ　ＶＡＬＬＥＹ",  # the allow-list is normalised too
        "a greg and a rutkowski",  # a multi-word term needs its words in order
        "a plain coffee cup",
    ],
)
def test_allowed_prompts_pass(policy: Policy, prompt: str) -> None:
    assert policy.check(prompt) is None


@pytest.mark.parametrize(
    ("prompt", "rule"),
    [
        ("acme_logo on a mug", "brands.acme"),  # "_" separates words
        ("acme-logo", "brands.acme"),
        ("Acme Valley, then acme", "brands.acme"),  # the allow-list covers its span only
        ("in the style of Greg  Rutkowski", "brands.greg-rutkowski"),
        ("greg-rutkowski style", "brands.greg-rutkowski"),
        ("GREG\u00a0RUTKОWSKI", "brands.greg-rutkowski"),  # no-break space, Cyrillic О
        ("a mug of AcmeCorporation", "brands.acme-corp"),  # a pattern, case-insensitive
        ("the Globexcorp tower", "substrings.globex"),  # whole_word = false
    ],
)
def test_blocked_prompts_name_their_rule(policy: Policy, prompt: str, rule: str) -> None:
    refusal = policy.check(prompt)
    assert refusal is not None and refusal.rule == rule, prompt


def test_negative_prompt_targets_and_length_are_checked(policy: Policy) -> None:
    negative = policy.check("a cup", negative="blurry, acme")
    assert negative is not None
    assert negative.message == 'blocked term "acme" (rule brands.acme) in negative prompt'
    target = policy.check("a cup", targets=["cup", "ACME mug"])
    assert target is not None and target.message.endswith('in target "ACME mug"')
    long = policy.check("a" * 121)
    assert long is not None and long.rule == "max_prompt_chars"
    assert "prompt is 121 characters" in long.message
    long_negative = policy.check("a cup", negative="b" * 121)
    assert long_negative is not None and "negative prompt is 121" in long_negative.message
    assert policy.check("a" * 120, negative="b" * 120, targets=["cup"]) is None


def test_normalize_keeps_ascii_words_apart() -> None:
    """ASCII is only case-folded (a full confusables skeleton would turn "m" into "rn")."""
    assert normalize("Modern Room 101") == "modern room 101"
    assert normalize("ｍｏｄｅｒｎ") == "modern"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("safety = 'maybe'", "safety"),
        ("colour = 'red'", "colour"),  # a misspelt key is an error, not a silent no-op
        ("[rules.a]\npatterns = ['(']", "pattern"),
        ("[rules.a]\nterms = ['--']", "no letters"),
        ("max_prompt_chars = ", "TOML"),
        ("[tenants.acme]\nrate_per_minute = 0", "rate_per_minute"),
    ],
)
def test_broken_policies_are_refused(text: str, phrase: str) -> None:
    with pytest.raises(PolicyError, match=phrase):
        Policy.from_toml(text)


# --- rate limits ------------------------------------------------------------------------

LIMITS = """
[rate_limit]
rate_per_minute = 60
burst = 1

[tenants.acme]
rate_per_minute = 6
burst = 2
"""


def test_token_bucket_per_tenant() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    policy = Policy.from_toml(LIMITS)
    assert [limiter.admit("acme", policy) is None for _ in range(3)] == [True, True, False]
    refusal = limiter.admit("acme", policy)
    assert refusal is not None and refusal.rule == "tenants.acme"
    assert refusal.message == (
        'tenant "acme" is over its rate limit '
        "(rate_per_minute = 6, burst = 2 per generator process; rule tenants.acme)"
    )
    # Others have their own buckets with the default limit; so do requests without a tenant.
    assert limiter.admit("globex", policy) is None
    other = limiter.admit("globex", policy)
    assert other is not None and "the default rate limit" in other.message
    assert limiter.admit(None, policy) is None
    anonymous = limiter.admit(None, policy)
    assert anonymous is not None and anonymous.message.startswith("a request without a tenant")
    clock.now += 9.9  # 6 per minute: one token every 10 s
    assert limiter.admit("acme", policy) is not None
    clock.now += 0.2
    assert limiter.admit("acme", policy) is None
    assert limiter.admit("acme", policy) is not None
    # A reloaded policy applies at once; no limit at all admits everything.
    assert limiter.admit("acme", Policy()) is None


# --- reloading --------------------------------------------------------------------------


def test_policy_file_reloads_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.toml"
    write(path, '[rules.brands]\nterms = ["acme"]\n')
    clock = Clock()
    store = PolicyStore(path, reload_interval_s=1.0, clock=clock)
    assert store.current().check("acme mug") is not None

    write(path, '[rules.brands]\nterms = ["globex"]\n')
    clock.now += 0.5  # checked at most every second
    assert store.current().check("acme mug") is not None
    clock.now += 0.5
    assert store.current().check("acme mug") is None
    assert store.current().check("globex mug") is not None
    assert store.loads == 2

    caplog.set_level(logging.ERROR, logger="gen_worker.policy")
    write(path, '[rules.brands]\nterms = ["initech"\n')  # broken: keeps the last good
    for _ in range(3):
        clock.now += 1.0
        assert store.current().check("globex mug") is not None
        assert store.current().check("initech mug") is None
    errors = [r for r in caplog.records if "keeping the last good policy" in r.getMessage()]
    assert len(errors) == 1, "one error per broken version, not one per check"
    assert store.errors == 1

    path.unlink()  # gone: keeps the last good too
    clock.now += 1.0
    assert store.current().check("globex mug") is not None
    assert store.errors == 2

    write(path, '[rules.brands]\nterms = ["initech"]\n')  # fixed
    clock.now += 1.0
    assert store.current().check("initech mug") is not None
    assert store.loads == 3


def test_first_load_of_a_broken_policy_fails(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    with pytest.raises(PolicyError, match=r"policy\.toml"):
        PolicyStore(path)
    write(path, "safety = 'sometimes'\n")
    with pytest.raises(PolicyError, match="safety"):
        PolicyStore(path)


# --- through the generator stage ----------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> GenModels:
    return GenModels.from_settings(Settings(models="tiny"), RuntimeOptions(device="cpu"))


class CountingGenerator(Generator):
    """A real generator that records the prompt of every sample it is asked to make."""

    def __init__(self, models: GenModels) -> None:
        super().__init__(models)
        self.prompts: list[str] = []
        self.negatives: list[str | None] = []

    def generate(  # type: ignore[override]
        self, spec: BatchSpec, samples: Sequence[Sample], **kw: Any
    ) -> list[SampleResult]:
        self.prompts += [s.prompt for s in samples]
        self.negatives += [s.negative_prompt for s in samples]
        return super().generate(spec, samples, **kw)


def context(blob_dir: Path) -> StageContext:
    return StageContext(blob=LocalBlobStore(blob_dir), topics=TOPICS, settings=None)


def ready(result: Any) -> list[ImageReadyEvent]:
    if isinstance(result, BaseException):
        raise result
    outputs: list[Output] = result
    return [parse_event(o.event.to_json_bytes(), ImageReadyEvent) for o in outputs]


def small(id: str, **kw: Any) -> PromptEvent:
    return PromptEvent(id=id, width=64, height=64, steps=2, seed=3, **kw)


def test_structured_prompts_are_built_in_order(models: GenModels, tmp_path: Path) -> None:
    generator = CountingGenerator(models)
    stage = GenStage(Settings(models="tiny"), generator=generator)
    events = [
        small("full", subject="a red fox", details="in fresh snow", style="oil painting",
              negative="blurry"),
        small("no-details", subject="a red fox", style="oil painting"),
        small("subject-only", subject="  a red fox  "),
        small("plain", prompt="a red fox, in fresh snow, oil painting"),
    ]  # fmt: skip
    results = [ready(r) for r in stage.handle(events, context(tmp_path))]
    built = [r[0].params.prompt for r in results]
    assert built == [
        "a red fox, in fresh snow, oil painting",
        "a red fox, oil painting",
        "a red fox",
        "a red fox, in fresh snow, oil painting",
    ]
    assert generator.prompts == built, "the generator got the built text"
    assert generator.negatives == ["blurry", None, None, None]
    assert results[0][0].params.negative_prompt == "blurry"
    # The same text as a structured or a plain prompt, the same seed: the same image.
    assert results[0][0].image.sha256 != results[3][0].image.sha256  # negative differs
    [again] = ready(stage.handle([small("full2", subject="a red fox", details="in fresh snow",
                                        style="oil painting")], context(tmp_path))[0])  # fmt: skip
    assert again.image.sha256 == results[3][0].image.sha256


def test_refused_requests_are_never_generated(models: GenModels, tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    write(path, POLICY)
    generator = CountingGenerator(models)
    stage = GenStage(
        Settings(models="tiny", policy=str(path)), generator=generator, policy_reload_s=0
    )
    blob_dir = tmp_path / "blobs"
    events = [
        small("brand", prompt="a mug by ＡＣМЕ"),
        small("ok", prompt="a mug in Acme Valley"),
        small("negative", prompt="a mug", negative_prompt="acme"),
        small("target", prompt="a mug", targets=["acme mug"]),
        small("structured", subject="a mug", style="by greg rutkowski"),
    ]
    results = stage.handle(events, context(blob_dir))
    assert [e.id for e in ready(results[1])] == ["ok"]
    expected = {
        "brand": 'blocked term "acme" (rule brands.acme) in prompt',
        "negative": 'blocked term "acme" (rule brands.acme) in negative prompt',
        "target": 'blocked term "acme" (rule brands.acme) in target "acme mug"',
        "structured": 'blocked term "Greg Rutkowski" (rule brands.greg-rutkowski) in prompt',
    }
    for event, result in zip(events, results, strict=True):
        if event.id in expected:
            assert isinstance(result, PermanentError) and result.error_type == "policy"
            assert str(result) == expected[event.id]
    assert generator.prompts == ["a mug in Acme Valley"], "only the admitted request ran"
    assert sorted(p.name for p in blob_dir.iterdir()) == ["ok"], "no blob for refused ones"

    # The file changes under the running stage: the next batch follows it.
    write(path, POLICY.replace('terms = ["acme", ', "terms = ["))
    [result] = stage.handle([small("brand", prompt="a mug by ＡＣМЕ")], context(blob_dir))
    assert [e.id for e in ready(result)] == ["brand"]
    write(path, "[rules.brands\n")  # broken: the last good policy stays
    [result] = stage.handle([small("greg", prompt="Greg Rutkowski")], context(blob_dir))
    assert isinstance(result, PermanentError) and "greg-rutkowski" in str(result)


def test_image_check_without_a_checker_is_a_broken_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    write(path, 'safety = "mark"\n')
    with pytest.raises(PolicyError, match="GENSEG_SAFETY_CHECKER"):
        GenStage(Settings(models="tiny", policy=str(path)))
    # Running with a good policy, a reload that asks for the check is refused.
    write(path, 'safety = "off"\n')
    stage = GenStage(Settings(models="tiny", policy=str(path)), policy_reload_s=0)
    assert stage.policy is not None
    write(path, 'safety = "refuse"\n')
    assert stage.policy.current().safety == "off"
    assert stage.policy.errors == 1


# --- through the runtime and the broker ---------------------------------------------------


def tenant_counts(metrics: StageMetrics) -> dict[tuple[str, str], float]:
    """``genseg_tenant_records_total`` by (tenant, outcome), scraped from the text format."""
    counts = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "genseg_tenant_records_total":
                counts[(sample.labels["tenant"], sample.labels["outcome"])] = sample.value
    return counts


async def test_tenant_over_its_rate_is_dead_lettered_while_another_flows(
    settings: Settings, models: GenModels, tmp_path: Path
) -> None:
    path = tmp_path / "policy.toml"
    # 0.1 per minute: no token comes back while the test runs.
    write(path, POLICY + "\n[tenants.acme]\nrate_per_minute = 0.1\nburst = 2\n")
    settings = settings.model_copy(update={"policy": str(path)})
    generator = CountingGenerator(models)
    acme = [small(f"acme-{i}", prompt=f"a teapot number {i}", tenant="acme") for i in range(4)]
    globex = [
        small(f"gx-{i}", subject=f"a lamp number {i}", details="brass", style="photo",
              tenant="globex")
        for i in range(3)
    ]  # fmt: skip
    anonymous = small("anon", prompt="a plain cup")
    blocked = small("blocked", prompt="an ACME anvil", tenant="globex")
    both_forms = {"id": "both", "prompt": "a cup", "subject": "a cup", "tenant": "initech"}
    config = RuntimeConfig(max_batch=4, max_wait_ms=50, **FAST)
    async with StageRuntime(GenStage(settings, generator=generator), settings, config) as rt:
        async with Publisher(settings) as pub:
            for event in [*acme, *globex, anonymous, blocked]:
                await pub.publish(settings.topics.prompts, event)
            raw = json.dumps(both_forms).encode()
            await pub.send(settings.topics.prompts, raw, key="both", headers=[])
        async with TopicReader(settings, "images", "dlq") as reader:
            await reader.until(
                lambda: len(reader.keys("images")) + len(reader.keys("dlq")) >= 10, timeout=120
            )
        expected_counts = {
            ("acme", "processed"): 2.0,
            ("acme", "rate_limited"): 2.0,
            ("globex", "processed"): 3.0,
            ("globex", "policy"): 1.0,
            ("-", "processed"): 1.0,
            ("initech", "dead_lettered"): 1.0,
        }
        # Counted once the broker acknowledged the outputs: poll, do not assume.
        await eventually(lambda: tenant_counts(rt.metrics) == expected_counts, timeout=10)

    images = {v["id"]: ImageReadyEvent.model_validate(v) for v in reader.values("images")}
    dead = {d["id"]: d for d in reader.values("dlq")}
    acme_images = sorted(i for i in images if i.startswith("acme-"))
    assert len(acme_images) == 2, "the burst of 2 was admitted"
    assert set(images) == {*acme_images, "gx-0", "gx-1", "gx-2", "anon"}
    for i in range(3):
        assert images[f"gx-{i}"].params.prompt == f"a lamp number {i}, brass, photo"
        assert images[f"gx-{i}"].tenant == "globex"
    limited = sorted(i for i in dead if i.startswith("acme-"))
    assert len(limited) == 2 and set(limited).isdisjoint(acme_images)
    for request_id in limited:
        d = dead[request_id]
        assert d["error"]["type"] == "rate_limited" and d["tenant"] == "acme"
        assert d["error"]["message"].startswith(
            'tenant "acme" is over its rate limit (rate_per_minute = 0.1, burst = 2'
        )
        assert d["attempts"] == 1 and d["stage"] == "gen"
    assert dead["blocked"]["error"] == {
        "type": "policy",
        "message": 'blocked term "acme" (rule brands.acme) in prompt',
    }
    assert dead["blocked"]["tenant"] == "globex"
    assert dead["both"]["error"]["type"] == "validation"
    assert "give either 'prompt' or 'subject'" in dead["both"]["error"]["message"]
    assert dead["both"]["tenant"] == "initech", "read from the invalid record itself"
    assert dead["both"]["attempts"] == 0
    # Nothing was generated for a refused request.
    admitted = {e.prompt_text() for e in [*acme, *globex, anonymous] if e.id in images}
    assert sorted(generator.prompts) == sorted(admitted)
    assert not any((Path(settings.blob_url) / i).exists() for i in dead)


def test_tenant_label_is_bounded() -> None:
    metrics = StageMetrics("gen", max_tenant_labels=2)
    for tenant in ["acme", "globex", "initech", None, "acme", "no spaces!"]:
        metrics.tenant_outcome(tenant, "processed")
    metrics.tenant_outcome("acme", "timeout")
    assert tenant_counts(metrics) == {
        ("acme", "processed"): 2.0,
        ("globex", "processed"): 1.0,
        ("-", "processed"): 3.0,  # a third tenant, none, and a malformed one
        ("acme", "dead_lettered"): 1.0,
    }


# --- the image check ----------------------------------------------------------------------


def tiny_checker(threshold: float) -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    """A StableDiffusionSafetyChecker with a tiny CLIP vision tower and random weights.

    Its decision is forced through its concept thresholds: cosine similarities lie in
    [-1, 1], so a threshold of -2 flags every image and +2 none.
    """
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = StableDiffusionSafetyChecker(
            CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
        )
    with torch.no_grad():
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, processor


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pretrained-profile model directory whose pipeline ships a flag-everything checker
    (diffusers' layout: safety_checker/, feature_extractor/), a separate flag-nothing
    checker directory, and the pretrained models loaded from the first."""
    root = tmp_path_factory.mktemp("checked")
    flagging, processor = tiny_checker(-2.0)
    components = build_random_components(tiny_arch())
    components.update(safety_checker=flagging, feature_extractor=processor)
    components["requires_safety_checker"] = True
    StableDiffusionPipeline(**components).save_pretrained(root / "sd")
    clean, processor = tiny_checker(2.0)
    clean.save_pretrained(root / "clean")
    processor.save_pretrained(root / "clean")
    settings = Settings(models="pretrained", sd_model=str(root / "sd"))
    return {
        "flag": str(root / "sd"),
        "clean": str(root / "clean"),
        "models": GenModels.from_settings(settings, RuntimeOptions(device="cpu")),
    }


def test_checker_loads_from_both_layouts(checked: dict[str, Any]) -> None:
    images = [r.image for r in _tiny_images(checked["models"], 2)]
    device = torch.device("cpu")
    assert SafetyChecker.load(checked["flag"], device=device).flagged(images) == [True, True]
    assert SafetyChecker.load(checked["clean"], device=device).flagged(images) == [False, False]
    assert SafetyChecker.load(checked["clean"], device=device).flagged([]) == []


def _tiny_images(models: GenModels, n: int) -> list[SampleResult]:
    spec = BatchSpec("txt2img", 64, 64, 2, 7.5, "dpmpp_2m")
    return Generator(models).generate(spec, [Sample("a cup", seed=i) for i in range(n)])


@pytest.mark.parametrize(
    ("checker", "mode", "outcome"),
    [
        ("flag", "mark", ["nsfw"]),
        ("clean", "mark", []),
        ("flag", "refuse", "refused"),
        ("clean", "refuse", []),
        ("flag", "off", None),
    ],
)
def test_image_check_marks_or_refuses(
    checked: dict[str, Any], tmp_path: Path, checker: str, mode: str, outcome: Any
) -> None:
    path = tmp_path / "policy.toml"
    write(path, f'safety = "{mode}"\n')
    settings = Settings(
        models="pretrained",
        sd_model=checked["flag"],
        safety_checker=checked[checker],
        policy=str(path),
    )
    stage = GenStage(settings, models=checked["models"])
    blob_dir = tmp_path / "blobs"
    [result] = stage.handle([small("img", prompt="a cup", num_images=2)], context(blob_dir))
    if outcome == "refused":
        assert isinstance(result, PermanentError) and result.error_type == "policy"
        assert str(result) == (
            'images 0, 1 flagged "nsfw" by the safety checker (policy safety = "refuse")'
        )
        assert not blob_dir.exists() or not any(blob_dir.iterdir()), "nothing was written"
        return
    events = ready(result)
    assert [e.flags for e in events] == [outcome, outcome]
    if outcome is not None:
        assert all("safety_check" in e.timings_ms for e in events)
        record = json.loads(events[0].to_json_bytes())
        assert record["flags"] == outcome  # in the record as the contract says


def test_checker_is_for_the_pretrained_profile_only(
    tmp_path: Path, checked: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gen_worker.handler")
    stage = GenStage(Settings(models="tiny", safety_checker=checked["flag"]))
    assert stage.safety is None
    assert any("pretrained profile only" in r.getMessage() for r in caplog.records)


def test_example_policy_file_is_valid() -> None:
    example = Path(__file__).parents[1] / "examples" / "policy.toml"
    policy = Policy.from_toml(example.read_text(encoding="utf-8"))
    assert policy.safety == "off" and policy.max_prompt_chars == 1000
    refusal = policy.check("a poster in the style of greg rutkowski")
    assert refusal is not None and refusal.rule == "artists.greg-rutkowski"
    assert policy.check("a hike in Acme Valley") is None
    assert policy.limit_for("acme") == RateLimit(60, 10)
    assert policy.limit_for("someone") == policy.limit_for(None) == RateLimit(600, 50)
