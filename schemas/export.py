"""JSON Schema and AsyncAPI 3.0 documents generated from the contract models."""

from __future__ import annotations

from typing import Any

from schemas.events import SCHEMA_DEAD_LETTER, SCHEMA_DELETION, SCHEMA_SCENE
from schemas.registry import CONTRACT_MODELS, CONTRACT_TOPICS
from schemas.topics import Topics

__all__ = ["CONTRACT_MODELS", "KAFKA_BINDING_VERSION", "asyncapi_document", "json_schemas"]

#: Version of the AsyncAPI Kafka bindings the document follows.
KAFKA_BINDING_VERSION = "0.5.0"


def json_schemas() -> dict[str, dict[str, Any]]:
    """One JSON Schema (validation mode) per contract schema name."""
    return {name: model.model_json_schema(by_alias=True) for name, model in CONTRACT_MODELS.items()}


def _key_description(schema: str) -> str:
    """What a record's key holds: the scene id for scene-ready events, else the request id."""
    if schema == SCHEMA_SCENE:
        return "the scene id (scene_id), UTF-8"
    if schema == SCHEMA_DELETION:
        return "the id of the deleted request (id), UTF-8"
    if schema == SCHEMA_DEAD_LETTER:
        return "the request id (id), UTF-8; empty when the failed record's id could not be read"
    return "the request id (id), UTF-8"


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
            # The key is a property of the message in the Kafka bindings, not of the channel.
            "bindings": {
                "kafka": {
                    "key": {"type": "string", "description": _key_description(name)},
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
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
        }
        for short, schema_names in CONTRACT_TOPICS.items()
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
