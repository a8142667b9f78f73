"""JSON Schema and AsyncAPI 3.0 documents generated from the contract models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from schemas.events import (
    AssetReadyEvent,
    DeadLetterEvent,
    ImageReadyEvent,
    InpaintEvent,
    MasksReadyEvent,
    ProgressEvent,
    PromptEvent,
    SceneReadyEvent,
)
from schemas.topics import Topics

#: schema name -> model, in contract order.
CONTRACT_MODELS: dict[str, type[BaseModel]] = {
    "genseg.prompt/v1": PromptEvent,
    "genseg.inpaint/v1": InpaintEvent,
    "genseg.image/v1": ImageReadyEvent,
    "genseg.masks/v1": MasksReadyEvent,
    "genseg.asset/v1": AssetReadyEvent,
    "genseg.progress/v1": ProgressEvent,
    "genseg.dead_letter/v1": DeadLetterEvent,
    "genseg.scene/v1": SceneReadyEvent,
}

#: short topic name -> the schemas its records carry.
TOPIC_MESSAGES: dict[str, list[str]] = {
    "prompts": ["genseg.prompt/v1", "genseg.inpaint/v1"],
    "images": ["genseg.image/v1"],
    "masks": ["genseg.masks/v1"],
    "assets": ["genseg.asset/v1"],
    "progress": ["genseg.progress/v1"],
    "dlq": ["genseg.dead_letter/v1"],
    "scenes": ["genseg.scene/v1"],
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (validation mode) per contract schema name."""
    return {name: model.model_json_schema(by_alias=True) for name, model in CONTRACT_MODELS.items()}


def _message_name(schema: str) -> str:
    return schema.replace("genseg.", "").replace("/", "_")


def asyncapi_document(topics: Topics | None = None) -> dict[str, Any]:
    """An AsyncAPI 3.0 document describing the topics and their messages."""
    topics = topics or Topics()
    schemas = {
        _message_name(name): model.model_json_schema(
            by_alias=True, ref_template="#/components/schemas/{model}"
        )
        for name, model in CONTRACT_MODELS.items()
    }
    # Hoist nested definitions so every $ref resolves inside components/schemas.
    components: dict[str, Any] = {}
    for name, schema in schemas.items():
        components.update(schema.pop("$defs", {}))
        components[name] = schema
    messages = {
        _message_name(name): {
            "name": name,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {"traceparent": {"type": "string"}, "tracestate": {"type": "string"}},
            },
            "payload": {"$ref": f"#/components/schemas/{_message_name(name)}"},
        }
        for name in CONTRACT_MODELS
    }
    channels = {
        short: {
            "address": topics.name(short),
            "messages": {
                _message_name(s): {"$ref": f"#/components/messages/{_message_name(s)}"}
                for s in schema_names
            },
            "bindings": {"kafka": {"key": {"type": "string", "description": "request id"}}},
        }
        for short, schema_names in TOPIC_MESSAGES.items()
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "genseg",
            "version": "1.0.0",
            "description": "Prompt events in, images, masks and RGBA assets out.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {"schemas": components, "messages": messages},
    }
