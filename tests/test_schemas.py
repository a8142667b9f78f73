"""The contract (DESIGN.md Part 1) as the models, the parser and the exported documents."""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # a dev dependency: these checks must run, never skip
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from plumbing.kafka import ensure_topics, make_producer
from plumbing.settings import Settings
from schemas import (
    CONTRACT_MODELS,
    CONTRACT_TOPICS,
    INTERNAL_MODELS,
    INTERNAL_TOPICS,
    SCHEMA_ASSET,
    SCHEMA_DEAD_LETTER,
    SCHEMA_DELETION,
    SCHEMA_IMAGE,
    SCHEMA_INPAINT,
    SCHEMA_MASKS,
    SCHEMA_MODELS,
    SCHEMA_PROGRESS,
    SCHEMA_PROMPT,
    SCHEMA_SCENE,
    SCHEMA_SCENE_VIEW,
    SCHEMA_WEBHOOK,
    TOPIC_NAMES,
    TOPIC_SCHEMAS,
    AssetItem,
    AssetReadyEvent,
    BlobRef,
    DeadLetterEvent,
    DeletionEvent,
    Event,
    ImageReadyEvent,
    InpaintEvent,
    InvalidEvent,
    MaskObject,
    MasksReadyEvent,
    ProgressEvent,
    PromptEvent,
    ResolvedParams,
    SceneReadyEvent,
    SceneView,
    SceneViewRecord,
    SourceInfo,
    Topics,
    WebhookDelivery,
    decode_record,
    parse_event,
    parse_prompts_record,
)
from schemas.events import DEAD_LETTER_VALUE_LIMIT, ID_PATTERN, RLE
from schemas.export import KAFKA_BINDING_VERSION, asyncapi_document, json_schemas
from schemas.topics import INTERNAL_TOPIC_NAMES
from tests.kafka_utils import TopicReader

SHA = "ab" * 32


def ref(name: str = "image.png", size: int = 10) -> BlobRef:
    return BlobRef(uri=f"file:///blobs/{name}", sha256=SHA, media_type="image/png", bytes=size)


def raw(data: Any) -> bytes:
    return json.dumps(data).encode()


def example_events() -> dict[str, Event]:
    """One valid, non-trivial event per contract schema."""
    params = ResolvedParams(
        prompt="a red fox",
        width=512,
        height=512,
        steps=25,
        guidance_scale=7.5,
        sampler="dpmpp_2m",
        seed=42,
    )
    return {
        SCHEMA_PROMPT: PromptEvent(id="req-1", prompt="a red fox", targets=["fox"], seed=7),
        SCHEMA_INPAINT: InpaintEvent(
            id="req-2", prompt="a blue fox", image=ref(), mask=ref("mask.png"), strength=0.6
        ),
        SCHEMA_IMAGE: ImageReadyEvent(
            id="req-1",
            image=ref(),
            params=params,
            model="tiny",
            heatmaps={"fox": ref("fox.png")},
            targets=["fox"],
            timings_ms={"gen": 12.5},
            model_revision="sha256:" + SHA,
        ),
        SCHEMA_MASKS: MasksReadyEvent(
            id="req-1",
            image=ref(),
            objects=[
                MaskObject(
                    label="fox",
                    score=0.93,
                    bbox=[1, 2, 30, 40],
                    area=900,
                    mask=ref("m.png"),
                    rle=RLE(size=[64, 64], counts="a1b2"),
                )
            ],
        ),
        SCHEMA_ASSET: AssetReadyEvent(
            id="req-1",
            status="ok",
            image=ref(),
            assets=[AssetItem(label="fox", score=0.93, bbox=[1, 2, 30, 40], asset=ref("a.png"))],
            masks=[ref("m.png")],
            segmenter="sam:tiny:tiny",
            segmenter_revision="seed:0",
            depth_revision="commit:" + "c" * 40,
            model_revision="sha256:" + SHA,
        ),
        SCHEMA_PROGRESS: ProgressEvent(id="req-1", image_index=0, step=3, steps=25),
        SCHEMA_DEAD_LETTER: DeadLetterEvent.build(
            stage="gen",
            error_type="invalid_event",
            message="prompt: too long",
            attempts=1,
            source=SourceInfo(topic="genseg.prompts", partition=0, offset=12),
            raw=b'{"id": "req-3"}',
            request_id="req-3",
        ),
        SCHEMA_SCENE: SceneReadyEvent(
            scene_id="room-1",
            views=[
                SceneView(view="0", angle=0.0, id="room-1.view-0", status="ok", image=ref()),
                SceneView(view="45", angle=45.0, id="room-1.view-45", status="ok", image=ref()),
            ],
        ),
        SCHEMA_DELETION: DeletionEvent(
            id="req-1",
            tenant="acme",
            blobs_deleted=4,
            bytes_deleted=81234,
            deleted_at="2025-01-02T03:04:05.678Z",
        ),
    }


# --- defaults and limits -----------------------------------------------------------


def test_prompt_defaults_are_the_contracts() -> None:
    event = parse_prompts_record(b'{"id": "req-1", "prompt": "a red fox"}')
    assert isinstance(event, PromptEvent)
    assert event.schema_ == SCHEMA_PROMPT == "genseg.prompt/v1"
    assert (event.width, event.height) == (512, 512)
    assert event.steps == 25
    assert event.guidance_scale == 7.5
    assert event.sampler == "dpmpp_2m"
    assert event.seed is None  # chosen and reported by the worker
    assert event.num_images == 1
    assert event.targets == []
    assert event.negative_prompt is None
    seg = event.segmentation
    assert seg.mode == "attention"
    assert seg.min_confidence == 0.8
    assert seg.max_objects == 5
    assert seg.smooth_px == 2
    assert seg.scales == [1.0]
    assert event.asset.crop is True


def test_defaults_are_not_shared_between_events() -> None:
    first = PromptEvent(id="a", prompt="x")
    first.segmentation.scales.append(0.5)
    first.targets.append("fox")
    second = PromptEvent(id="b", prompt="x")
    assert second.segmentation.scales == [1.0]
    assert second.targets == []


VALID = {"id": "req-1", "prompt": "a red fox"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "a"),
        ("id", "x" * 128),
        ("id", "Az09._:-"),
        ("prompt", "p"),
        ("prompt", "p" * 2000),
        ("targets", [f"t{i}" for i in range(10)]),
        ("num_images", 1),
        ("num_images", 8),
        ("width", 64),
        ("width", 2048),
        ("width", 520),
        ("height", 64),
        ("height", 2048),
        ("steps", 1),
        ("steps", 150),
    ],
)
def test_limits_accept_their_boundaries(field: str, value: Any) -> None:
    event = parse_prompts_record(raw({**VALID, field: value}))
    assert getattr(event, field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("id", "x" * 129),
        ("id", "a b"),
        ("id", "a/b"),
        ("id", "a\n"),
        ("id", "é"),
        ("id", 42),
        ("prompt", ""),
        ("prompt", "p" * 2001),
        ("targets", [f"t{i}" for i in range(11)]),
        ("targets", ["  "]),
        ("num_images", 0),
        ("num_images", 9),
        ("width", 56),
        ("width", 2056),
        ("width", 100),
        ("width", 65),
        ("height", 516),
        ("height", 0),
        ("steps", 0),
        ("steps", 151),
        ("sampler", "plms"),
        ("guidance_scale", -1),
        ("seed", -1),
        ("seed", 2**32),
        ("segmentation", {"mode": "boxes"}),
        ("segmentation", {"min_confidence": 1.5}),
        ("segmentation", {"scales": []}),
        ("segmentation", {"mode": "boxes", "boxes": [[0, 0, 0, 10]]}),
    ],
)
def test_limits_refuse_values_outside(field: str, value: Any) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_prompts_record(raw({**VALID, field: value}))
    # The request id travels with the error when it is usable as a key.
    if field != "id":
        assert info.value.request_id == "req-1"


@pytest.mark.parametrize("missing", ["id", "prompt"])
def test_required_fields(missing: str) -> None:
    data = dict(VALID)
    del data[missing]
    with pytest.raises(InvalidEvent, match=missing):
        parse_prompts_record(raw(data))


def test_structured_prompt_is_built_in_order_and_exclusive_with_prompt() -> None:
    base = {k: v for k, v in VALID.items() if k != "prompt"}
    event = parse_prompts_record(
        raw({**base, "subject": "a red fox", "details": "in snow", "style": "watercolor"})
    )
    assert event.prompt_text() == "a red fox, in snow, watercolor"
    assert parse_prompts_record(raw({**base, "subject": "a fox"})).prompt_text() == "a fox"
    with pytest.raises(InvalidEvent, match="not both"):
        parse_prompts_record(raw({**VALID, "subject": "a fox"}))
    with pytest.raises(InvalidEvent, match="subject"):
        parse_prompts_record(raw({**base, "details": "in snow"}))
    with pytest.raises(InvalidEvent, match="longer than"):
        parse_prompts_record(raw({**base, "subject": "x" * 1500, "style": "y" * 1500}))


def test_explicit_segmentation_modes() -> None:
    event = parse_prompts_record(
        raw(
            {
                **VALID,
                "segmentation": {
                    "mode": "points",
                    "points": [{"x": 3, "y": 4}, {"x": 5, "y": 6, "label": 0}],
                    "scales": [0.5, 0.75, 1.0],
                },
                "asset": {"crop": False},
            }
        )
    )
    assert event.segmentation.mode == "points"
    assert [p.label for p in event.segmentation.points or []] == [1, 0]
    assert event.segmentation.scales == [0.5, 0.75, 1.0]
    assert event.asset.crop is False


# --- forward compatibility and the prompts topic --------------------------------------


def test_unknown_fields_are_ignored_everywhere() -> None:
    event = parse_prompts_record(
        raw(
            {
                **VALID,
                "future": {"nested": [1, 2, 3]},
                "segmentation": {"max_objects": 3, "new_option": True},
                "asset": {"crop": False, "format": "webp"},
            }
        )
    )
    assert event.segmentation.max_objects == 3
    assert event.asset.crop is False
    out = json.loads(event.to_json_bytes())
    assert "future" not in out
    assert "new_option" not in out["segmentation"]


@pytest.mark.parametrize("name", list(CONTRACT_MODELS))
def test_every_event_ignores_unknown_fields(name: str) -> None:
    event = example_events()[name]
    data = {**json.loads(event.to_json_bytes()), "added_in_v1_1": {"x": 1}}
    assert parse_event(raw(data), CONTRACT_MODELS[name]) == event


def test_a_record_without_schema_is_a_prompt_event() -> None:
    event = parse_prompts_record(raw(VALID))
    assert type(event) is PromptEvent
    assert event.schema_ == SCHEMA_PROMPT


def test_inpaint_events_on_the_prompts_topic() -> None:
    data = {
        "schema": SCHEMA_INPAINT,
        "id": "req-2",
        "prompt": "a blue fox",
        "image": ref().model_dump(),
        "mask": ref("mask.png").model_dump(),
        "steps": 30,
    }
    event = parse_prompts_record(raw(data))
    assert type(event) is InpaintEvent
    assert event.mask.uri.endswith("mask.png")
    assert event.steps == 30 and event.width == 512  # the generation options apply
    assert event.strength == 1.0
    # An inpaint event needs its image and mask; the id still travels with the error.
    del data["mask"]
    with pytest.raises(InvalidEvent, match="mask") as info:
        parse_prompts_record(raw(data))
    assert info.value.request_id == "req-2"


def test_a_prompt_schema_with_inpaint_fields_stays_a_prompt() -> None:
    data = {**VALID, "schema": SCHEMA_PROMPT, "image": ref().model_dump()}
    assert type(parse_prompts_record(raw(data))) is PromptEvent


@pytest.mark.parametrize(
    "schema", ["genseg.prompt/v2", SCHEMA_IMAGE, "", None, 42, ["genseg.prompt/v1"], {"a": 1}]
)
def test_unknown_schema_is_refused_on_the_prompts_topic(schema: Any) -> None:
    with pytest.raises(InvalidEvent, match="schema") as info:
        parse_prompts_record(raw({**VALID, "schema": schema}))
    assert info.value.request_id == "req-1"


def test_parse_event_refuses_another_events_schema() -> None:
    image = example_events()[SCHEMA_IMAGE].to_json_bytes()
    with pytest.raises(InvalidEvent, match="schema"):
        parse_event(image, MasksReadyEvent)


@pytest.mark.parametrize(
    "value",
    [b"", b"\xff\xfe", b"not json", b"[1, 2]", b'"a string"', b"null", b"{", b"1e999999"],
)
def test_values_that_are_not_json_objects(value: bytes) -> None:
    with pytest.raises(InvalidEvent):
        parse_prompts_record(value)
    with pytest.raises(InvalidEvent):
        parse_event(value, ImageReadyEvent)


def test_integers_beyond_the_conversion_limit_are_invalid_events() -> None:
    # json.loads raises a plain ValueError for integers of more than 4300 digits.
    value = b'{"id": "a", "prompt": "x", "width": ' + b"9" * 5000 + b"}"
    with pytest.raises(InvalidEvent):
        parse_prompts_record(value)


# --- serialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONTRACT_MODELS))
def test_serialisation_uses_schema_as_the_key_and_round_trips(name: str) -> None:
    event = example_events()[name]
    value = event.to_json_bytes()
    data = json.loads(value)
    assert data["schema"] == name
    assert "schema_" not in data
    assert event.model_dump()["schema"] == name  # by alias in Python too
    assert None not in data.values()  # absent optional fields are left out
    assert parse_event(value, CONTRACT_MODELS[name]) == event
    assert len(value) < 64 * 1024
    if name in (SCHEMA_PROMPT, SCHEMA_INPAINT):
        assert parse_prompts_record(value) == event


def test_blob_references_are_claim_checks() -> None:
    data = json.loads(example_events()[SCHEMA_IMAGE].to_json_bytes())
    assert set(data["image"]) == {"uri", "sha256", "media_type", "bytes"}
    with pytest.raises(InvalidEvent, match="sha256"):
        parse_event(raw({**data, "image": {**data["image"], "sha256": "XYZ"}}), ImageReadyEvent)


# --- dead letters ------------------------------------------------------------------------


def _dead_letter(raw_value: bytes, message: str = "boom") -> DeadLetterEvent:
    return DeadLetterEvent.build(
        stage="seg",
        error_type="transient",
        message=message,
        attempts=3,
        source=SourceInfo(topic="genseg.images", partition=2, offset=99),
        raw=raw_value,
    )


def test_dead_letter_keeps_a_small_value_whole() -> None:
    event = _dead_letter(b'{"id": "x"}')
    assert event.value == '{"id": "x"}'
    assert event.value_truncated is False
    assert event.id is None and event.image_index is None
    assert json.loads(event.to_json_bytes())["source"] == {
        "topic": "genseg.images",
        "partition": 2,
        "offset": 99,
    }


def test_dead_letter_value_is_exactly_the_limit_untruncated() -> None:
    event = _dead_letter(b"a" * DEAD_LETTER_VALUE_LIMIT)
    assert len(event.value) == DEAD_LETTER_VALUE_LIMIT
    assert event.value_truncated is False


@pytest.mark.parametrize(
    "text",
    ["a", "é", "€", "😀", "\x00", "a€😀"],
    ids=["ascii", "2-byte", "3-byte", "4-byte", "control", "mixed"],
)
def test_dead_letter_truncates_to_64_kib(text: str) -> None:
    original = text * (3 * DEAD_LETTER_VALUE_LIMIT // len(text))
    event = _dead_letter(original.encode())
    assert DEAD_LETTER_VALUE_LIMIT == 64 * 1024
    assert event.value_truncated is True
    encoded = event.value.encode("utf-8")
    assert DEAD_LETTER_VALUE_LIMIT - 4 < len(encoded) <= DEAD_LETTER_VALUE_LIMIT
    assert original.startswith(event.value)  # a prefix, no character cut in half
    assert len(event.to_json_bytes()) < 512 * 1024  # far below Kafka's 1 MiB


def test_dead_letter_of_bytes_that_are_not_utf8() -> None:
    event = _dead_letter(b"\xff" * (DEAD_LETTER_VALUE_LIMIT * 2), message="m" * 10_000)
    assert event.value_truncated is True
    assert set(event.value) == {"\ufffd"}
    assert len(event.value.encode()) <= DEAD_LETTER_VALUE_LIMIT
    assert len(event.error.message) == 4096
    assert parse_event(event.to_json_bytes(), DeadLetterEvent) == event


# --- topics -------------------------------------------------------------------------------


def test_topic_names() -> None:
    topics = Topics()
    assert topics.prefix == "genseg"
    assert topics.prompts == "genseg.prompts"
    assert topics.images == "genseg.images"
    assert topics.masks == "genseg.masks"
    assert topics.assets == "genseg.assets"
    assert topics.progress == "genseg.progress"
    assert topics.dlq == "genseg.dlq"
    assert topics.scenes == "genseg.scenes"
    assert topics.deletions == "genseg.deletions"
    assert topics.all() == [f"genseg.{n}" for n in TOPIC_NAMES]
    assert set(TOPIC_NAMES) == {
        "prompts", "images", "masks", "assets", "progress", "dlq", "scenes", "deletions",
    }  # fmt: skip


def test_topic_names_with_a_prefix() -> None:
    topics = Topics("acme-staging")
    assert topics.prompts == "acme-staging.prompts"
    assert topics.name("dlq") == "acme-staging.dlq"
    assert all(name.startswith("acme-staging.") for name in topics.all())
    with pytest.raises(ValueError, match="unknown topic"):
        topics.name("prompt")


# --- the topic -> schema registry ----------------------------------------------------------


def scene_view_record() -> SceneViewRecord:
    """A valid internal event of the scene-views topic."""
    asset = example_events()[SCHEMA_ASSET]
    assert isinstance(asset, AssetReadyEvent)
    scene = schemas.SceneOptions(scene_id="room-1", view="0", views_total=4, angle=0.0)
    return SceneViewRecord.of(asset.model_copy(update={"scene": scene}))


def every_event() -> dict[str, Event]:
    """One valid event per schema the registry knows, contract and internal."""
    webhook = WebhookDelivery(
        id="req-1", image_index=0, delivery="d" * 32, outcome="asset", status="delivered",
        http_status=204, attempts=1, host="127.0.0.1",
    )  # fmt: skip
    return {**example_events(), SCHEMA_SCENE_VIEW: scene_view_record(), SCHEMA_WEBHOOK: webhook}


def test_registry_covers_every_topic_and_schema_once() -> None:
    assert tuple(CONTRACT_TOPICS) == TOPIC_NAMES
    assert tuple(INTERNAL_TOPICS) == INTERNAL_TOPIC_NAMES
    assert dict(TOPIC_SCHEMAS) == {**CONTRACT_TOPICS, **INTERNAL_TOPICS}
    # Every schema is carried by exactly one topic, contract schemas by contract topics;
    # the one exception: the webhook dispatcher's given-up deliveries are dead letters on
    # the internal webhooks topic (they end no request, so they are not on the dlq).
    carried = [name for names in TOPIC_SCHEMAS.values() for name in names]
    assert sorted(carried) == sorted([*SCHEMA_MODELS, SCHEMA_DEAD_LETTER])
    assert INTERNAL_TOPICS["webhooks"] == (SCHEMA_WEBHOOK, SCHEMA_DEAD_LETTER)
    assert {n for names in CONTRACT_TOPICS.values() for n in names} == set(CONTRACT_MODELS)
    assert CONTRACT_TOPICS["prompts"] == (SCHEMA_PROMPT, SCHEMA_INPAINT)
    assert INTERNAL_TOPICS["scene-views"] == (SCHEMA_SCENE_VIEW,)
    assert CONTRACT_TOPICS["deletions"] == (SCHEMA_DELETION,)


@pytest.mark.parametrize("topic", list(TOPIC_SCHEMAS))
def test_decode_record_accepts_its_topics_events_only(topic: str) -> None:
    for name, event in every_event().items():
        value = event.to_json_bytes()
        if name in TOPIC_SCHEMAS[topic]:
            decoded = decode_record(topic, value)
            assert type(decoded) is SCHEMA_MODELS[name]
            assert decoded == event
        else:
            with pytest.raises(InvalidEvent, match=f"unknown schema .* on the {topic} topic"):
                decode_record(topic, value)


def test_decode_record_reads_a_prompts_record_without_schema_as_a_prompt() -> None:
    assert decode_record("prompts", raw(VALID)) == parse_prompts_record(raw(VALID))
    assert type(decode_record("prompts", raw(VALID))) is PromptEvent
    # Only the prompts topic has a default: elsewhere a record must name its schema.
    image = json.loads(example_events()[SCHEMA_IMAGE].to_json_bytes())
    del image["schema"]
    with pytest.raises(InvalidEvent, match="unknown schema"):
        decode_record("images", raw(image))


def test_decode_record_refuses_invalid_events_and_unknown_topics() -> None:
    masks = json.loads(example_events()[SCHEMA_MASKS].to_json_bytes())
    with pytest.raises(InvalidEvent, match="objects") as caught:
        decode_record("masks", raw({**masks, "objects": [{"label": "fox"}]}))
    assert caught.value.request_id == "req-1"
    with pytest.raises(InvalidEvent, match="not JSON"):
        decode_record("assets", b"{")
    with pytest.raises(KeyError, match="unknown topic"):
        decode_record("prompt", raw(VALID))


async def test_topic_reader_fails_on_a_record_its_topic_does_not_carry(settings: Settings) -> None:
    # The tests' reader checks every record against the registry; this shows it can fail.
    await ensure_topics(settings, partitions=1)
    producer = make_producer(settings)
    await producer.start()
    try:
        good = example_events()[SCHEMA_IMAGE].to_json_bytes()
        prompt = example_events()[SCHEMA_PROMPT].to_json_bytes()  # valid, but not an image
        for value in (good, prompt):
            await producer.send_and_wait(settings.topics.images, value, key=b"req-1")
        await producer.send_and_wait(settings.topics.prompts, raw(VALID), key=b"req-1")
    finally:
        await producer.stop()
    async with TopicReader(settings, "prompts") as reader:
        await reader.until(lambda: len(reader.values("prompts")) == 1)
    with pytest.raises(AssertionError, match=r"partition 0 offset 1: .*'images'.*unknown schema"):
        async with TopicReader(settings, "images") as reader:
            await reader.until(lambda: len(reader.values("images")) == 2, timeout=30)
    async with TopicReader(settings, "images", unchecked=["images"]) as reader:
        await reader.until(lambda: len(reader.values("images")) == 2)


# --- exported documents --------------------------------------------------------------------


def test_contract_models_cover_every_event() -> None:
    constants = {
        value
        for name, value in vars(schemas).items()
        if name.startswith("SCHEMA_") and isinstance(value, str)
    }
    assert set(SCHEMA_MODELS) == constants
    internal = {SCHEMA_SCENE_VIEW, SCHEMA_WEBHOOK}
    assert set(CONTRACT_MODELS) == constants - internal == set(example_events())
    assert set(INTERNAL_MODELS) == internal
    for name, model in SCHEMA_MODELS.items():
        assert model.model_fields["schema_"].default == name


def test_json_schemas_cover_every_event() -> None:
    documents = json_schemas()
    assert set(documents) == set(CONTRACT_MODELS)
    for name, document in documents.items():
        json.dumps(document)  # plain JSON
        assert document["type"] == "object"
        assert "schema" in document["properties"]
        assert "schema_" not in document["properties"]
        assert document["properties"]["schema"]["const"] == name
    prompt = documents[SCHEMA_PROMPT]
    # 'prompt' or a structured 'subject': only the id is required by the schema itself.
    assert set(prompt["required"]) == {"id"}
    width = prompt["properties"]["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"], width["default"]) == (
        64,
        2048,
        8,
        512,
    )


@pytest.mark.parametrize("name", list(CONTRACT_MODELS))
def test_json_schemas_validate_events(name: str) -> None:
    document = json_schemas()[name]
    validator_class = jsonschema.validators.validator_for(document)
    validator_class.check_schema(document)
    validator = validator_class(document)
    good = json.loads(example_events()[name].to_json_bytes())
    validator.validate(good)
    assert not validator.is_valid({**good, "schema": "genseg.other/v9"})
    key = "scene_id" if "scene_id" in good else "id"  # scenes are keyed by their scene
    assert not validator.is_valid({**good, key: 5})


@pytest.mark.parametrize(
    ("field", "value"), [("width", 100), ("steps", 0), ("id", "a b"), ("prompt", "")]
)
def test_json_schema_refuses_what_the_models_refuse(field: str, value: Any) -> None:
    validator = jsonschema.Draft202012Validator(json_schemas()[SCHEMA_PROMPT])
    assert validator.is_valid(VALID)
    assert not validator.is_valid({**VALID, field: value})
    with pytest.raises(InvalidEvent):
        parse_prompts_record(raw({**VALID, field: value}))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for key, value in node.items() if key != "$ref" for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(document: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), f"{pointer} leaves the document"
    node: Any = document
    for part in pointer[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{pointer} does not resolve"
        node = node[part]
    return node


def test_asyncapi_document() -> None:
    document = asyncapi_document()
    json.dumps(document)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] and document["info"]["version"]
    channels = document["channels"]
    assert set(channels) == set(CONTRACT_TOPICS) == set(TOPIC_NAMES)
    for short, channel in channels.items():
        assert channel["address"] == Topics().name(short)
        assert channel["messages"], short
    # Every event of the contract is a message of some channel; both prompts-topic events
    # are messages of the prompts channel.
    messages = {
        _resolve(document, m["$ref"])["name"]
        for channel in channels.values()
        for m in channel["messages"].values()
    }
    assert messages == set(CONTRACT_MODELS)
    prompts = {
        _resolve(document, m["$ref"])["name"] for m in channels["prompts"]["messages"].values()
    }
    assert prompts == {SCHEMA_PROMPT, SCHEMA_INPAINT}
    for message in document["components"]["messages"].values():
        assert "traceparent" in message["headers"]["properties"]


def test_asyncapi_kafka_key_is_a_message_binding() -> None:
    # AsyncAPI Kafka bindings: the key belongs to the message; a channel binding has none.
    document = asyncapi_document()
    for short, channel in document["channels"].items():
        assert "key" not in channel.get("bindings", {}).get("kafka", {}), short
    for name, message in document["components"]["messages"].items():
        kafka = message["bindings"]["kafka"]
        assert kafka["bindingVersion"] == KAFKA_BINDING_VERSION, name
        assert kafka["key"]["type"] == "string", name
    messages = {m["name"]: m for m in document["components"]["messages"].values()}
    assert "scene_id" in messages[SCHEMA_SCENE]["bindings"]["kafka"]["key"]["description"]


def test_asyncapi_refs_all_resolve_inside_the_document() -> None:
    document = asyncapi_document()
    refs = _refs(document)
    assert len(refs) > 20
    for pointer in refs:
        _resolve(document, pointer)
    assert "$defs" not in json.dumps(document)  # every definition was hoisted


def test_asyncapi_addresses_follow_the_prefix() -> None:
    document = asyncapi_document(Topics("acme"))
    assert {c["address"] for c in document["channels"].values()} == {
        f"acme.{short}" for short in CONTRACT_TOPICS
    }


@pytest.mark.parametrize("name", list(CONTRACT_MODELS))
def test_asyncapi_payloads_validate_events(name: str) -> None:
    document = asyncapi_document()
    message = next(m for m in document["components"]["messages"].values() if m["name"] == name)
    # Validate with the document as the root, so the payload's $refs resolve as a tool would.
    schema = {**message["payload"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    good = json.loads(example_events()[name].to_json_bytes())
    validator.validate(good)
    assert not validator.is_valid({**good, "schema": "genseg.other/v9"})


# --- hostile input: nothing but InvalidEvent -------------------------------------------------

PARSERS = [
    parse_prompts_record,
    *(lambda value, model=model: parse_event(value, model) for model in SCHEMA_MODELS.values()),
    *(lambda value, topic=topic: decode_record(topic, value) for topic in TOPIC_SCHEMAS),
]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def _field_names() -> list[str]:
    names: set[str] = set()
    for model in (*SCHEMA_MODELS.values(), schemas.SegmentationOptions, BlobRef):
        for field_name, info in model.model_fields.items():
            names.add(info.alias or field_name)
    return sorted(names)


FIELD_NAMES = _field_names()

# Values near the ones the models expect, plus anything at all.
near_values = (
    json_values
    | st.sampled_from([SCHEMA_PROMPT, SCHEMA_INPAINT, SCHEMA_IMAGE, "req-1", 512, 7.5, 0, -1])
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.lists(st.sampled_from(["fox", "", " ", "x" * 200]), max_size=12)
    | st.fixed_dictionaries({}, optional={k: json_values for k in ["uri", "sha256", "bytes"]})
)
field_objects = st.dictionaries(st.sampled_from(FIELD_NAMES), near_values, max_size=12)
nested_field_objects = st.builds(
    lambda top, inner, where: {**top, where: inner},
    field_objects,
    field_objects,
    st.sampled_from(["segmentation", "asset", "image", "mask", "params", "progressive"]),
)


def _only_invalid_event(value: bytes) -> None:
    for parse in PARSERS:
        try:
            event = parse(value)
        except InvalidEvent:
            continue
        # Whatever is accepted serialises and reads back as the same event.
        assert parse(event.to_json_bytes()) == event


fuzz = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=300))
def test_arbitrary_bytes(value: bytes) -> None:
    _only_invalid_event(value)


@fuzz
@given(json_values)
def test_arbitrary_json_values(value: Any) -> None:
    _only_invalid_event(json.dumps(value).encode())


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field_objects | nested_field_objects)
def test_objects_of_the_real_field_names(value: dict[str, Any]) -> None:
    _only_invalid_event(json.dumps(value).encode())


@fuzz
@given(
    st.integers(min_value=1, max_value=100_000),
    st.sampled_from(["[", '{"a":', '{"segmentation":', '{"id":"r","prompt":"p","targets":']),
    st.sampled_from(["schema", "segmentation", "targets", "id", "image"]),
)
def test_deeply_nested_json(depth: int, opener: str, field: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    _only_invalid_event(f'{{"id": "r", "prompt": "p", "{field}": {nested}}}'.encode())
    _only_invalid_event(nested.encode())


@fuzz
@given(st.integers(min_value=4000, max_value=20_000), st.sampled_from(["width", "seed", "schema"]))
def test_huge_numbers(digits: int, field: str) -> None:
    _only_invalid_event(f'{{"id": "r", "prompt": "p", "{field}": {"7" * digits}}}'.encode())


# --- valid events always round-trip ---------------------------------------------------------

valid_prompts = st.builds(
    PromptEvent,
    id=st.from_regex(ID_PATTERN, fullmatch=True),
    prompt=st.text(min_size=1, max_size=2000),
    negative_prompt=st.none() | st.text(max_size=100),
    targets=st.lists(
        st.text(min_size=1, max_size=20).filter(lambda s: s.strip() == s and s), max_size=10
    ),
    width=st.integers(8, 256).map(lambda n: n * 8),
    height=st.integers(8, 256).map(lambda n: n * 8),
    steps=st.integers(1, 150),
    guidance_scale=st.floats(0, 30),
    seed=st.none() | st.integers(0, 2**32 - 1),
    num_images=st.integers(1, 8),
)


@settings(max_examples=300, deadline=None)
@given(valid_prompts)
def test_valid_prompt_events_round_trip(event: PromptEvent) -> None:
    value = event.to_json_bytes()
    assert parse_prompts_record(value) == event
    assert json.loads(value)["schema"] == SCHEMA_PROMPT


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(literal: str) -> None:
    # Python's json reads these; JSON has no such numbers and they would serialise as null.
    asset = json.loads(example_events()[SCHEMA_ASSET].to_json_bytes())
    value = json.dumps({**asset, "timings_ms": {"seg": 1.0}}).replace("1.0", literal)
    with pytest.raises(InvalidEvent, match="finite"):
        parse_event(value.encode(), AssetReadyEvent)
    with pytest.raises(InvalidEvent, match="finite"):
        parse_prompts_record(f'{{"id": "a", "prompt": "p", "guidance_scale": {literal}}}'.encode())
