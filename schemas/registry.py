"""The one topic -> schema registry: which events each topic carries, and decoding by topic.

Covers the contract's topics (:data:`schemas.topics.TOPIC_NAMES`) and genseg's internal
ones (:data:`schemas.topics.INTERNAL_TOPIC_NAMES`). Topics are named by their short name
(``"prompts"``, ``"scene-views"``), without the prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from schemas.events import (
    SCHEMA_ASSET,
    SCHEMA_DEAD_LETTER,
    SCHEMA_DELETION,
    SCHEMA_IMAGE,
    SCHEMA_INPAINT,
    SCHEMA_MASKS,
    SCHEMA_PROGRESS,
    SCHEMA_PROMPT,
    SCHEMA_SCENE,
    AssetReadyEvent,
    DeadLetterEvent,
    DeletionEvent,
    Event,
    ImageReadyEvent,
    InpaintEvent,
    MasksReadyEvent,
    ProgressEvent,
    PromptEvent,
    SceneReadyEvent,
)
from schemas.internal import SCHEMA_SCENE_VIEW, SCHEMA_WEBHOOK, SceneViewRecord, WebhookDelivery
from schemas.parse import parse_by_schema

#: Schema name -> model of every contract event, in contract order.
CONTRACT_MODELS: Mapping[str, type[Event]] = MappingProxyType(
    {
        SCHEMA_PROMPT: PromptEvent,
        SCHEMA_INPAINT: InpaintEvent,
        SCHEMA_IMAGE: ImageReadyEvent,
        SCHEMA_MASKS: MasksReadyEvent,
        SCHEMA_ASSET: AssetReadyEvent,
        SCHEMA_PROGRESS: ProgressEvent,
        SCHEMA_DEAD_LETTER: DeadLetterEvent,
        SCHEMA_SCENE: SceneReadyEvent,
        SCHEMA_DELETION: DeletionEvent,
    }
)

#: Schema name -> model of the events genseg passes between its own stages.
INTERNAL_MODELS: Mapping[str, type[Event]] = MappingProxyType(
    {SCHEMA_SCENE_VIEW: SceneViewRecord, SCHEMA_WEBHOOK: WebhookDelivery}
)

#: Schema name -> model of every event, contract and internal.
SCHEMA_MODELS: Mapping[str, type[Event]] = MappingProxyType({**CONTRACT_MODELS, **INTERNAL_MODELS})

#: Contract topic (short name) -> the schema names its records carry.
CONTRACT_TOPICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "prompts": (SCHEMA_PROMPT, SCHEMA_INPAINT),
        "images": (SCHEMA_IMAGE,),
        "masks": (SCHEMA_MASKS,),
        "assets": (SCHEMA_ASSET,),
        "progress": (SCHEMA_PROGRESS,),
        "dlq": (SCHEMA_DEAD_LETTER,),
        "scenes": (SCHEMA_SCENE,),
        "deletions": (SCHEMA_DELETION,),
    }
)

#: Internal topic (short name) -> the schema names its records carry.
INTERNAL_TOPICS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"scene-views": (SCHEMA_SCENE_VIEW,), "webhooks": (SCHEMA_WEBHOOK, SCHEMA_DEAD_LETTER)}
)

#: Every topic (short name) -> the schema names its records carry.
TOPIC_SCHEMAS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {**CONTRACT_TOPICS, **INTERNAL_TOPICS}
)

#: Topic -> the schema a record without a ``schema`` field is read as (DESIGN.md Part 1:
#: on the prompts topic, a prompt event). Records of other topics must name theirs.
DEFAULT_SCHEMAS: Mapping[str, str] = MappingProxyType({"prompts": SCHEMA_PROMPT})


def topic_models(topic: str) -> dict[str, type[Event]]:
    """Schema name -> model of the events ``topic`` (a short name) carries.

    Raises :class:`KeyError` for a topic the registry does not know.
    """
    try:
        names = TOPIC_SCHEMAS[topic]
    except KeyError:
        raise KeyError(f"unknown topic {topic!r}; expected one of {list(TOPIC_SCHEMAS)}") from None
    return {name: SCHEMA_MODELS[name] for name in names}


def decode_record(topic: str, raw: bytes) -> Event:
    """Decode and validate the value of a record of ``topic`` (a short name) by its ``schema``.

    Raises :class:`schemas.parse.InvalidEvent` when ``raw`` is not a valid event of that
    topic, :class:`KeyError` for an unknown topic.
    """
    return parse_by_schema(
        raw,
        topic_models(topic),
        default=DEFAULT_SCHEMAS.get(topic),
        where=f" on the {topic} topic",
    )


def parse_prompts_record(raw: bytes) -> PromptEvent | InpaintEvent:
    """Decode a record of the prompts topic: ``schema`` tells prompt from inpaint.

    A record without ``schema`` is read as a prompt event.
    """
    event = decode_record("prompts", raw)
    assert isinstance(event, PromptEvent | InpaintEvent)  # the prompts topic's only models
    return event
