"""The wire contract: what a producer in any language sends for the workers to apply.

The contract is a JSON Schema (draft 2020-12) of one batch, with the Celery task message that
carries it in ``$defs/Task``. It is generated from the event models of :mod:`sessions.events`
(their ``WithJsonSchema`` says what each validator accepts) plus what this module adds: the
routing, the fields the wire requires, each field's meaning, and the compatibility rule. The
package ships the generated copy (``sessions/wire.schema.json``); ``sessions schema`` prints it.

After a change to the models, regenerate it with ``python -m sessions.wire >
sessions/wire.schema.json``; ``tests/unit/test_wire_schema.py`` fails until the shipped copy
matches, and until :data:`WIRE_VERSION` and :data:`RULES_DIGEST` are updated when the rules
(not only their wording) changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.resources import files
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

#: The contract's version, ``MAJOR.MINOR`` (the compatibility rule is in :data:`COMPATIBILITY`).
WIRE_VERSION = "1.1"
#: SHA-256 of the rules of :data:`WIRE_VERSION`: the schema without its prose (see
#: :func:`rules_digest`). A change of the rules without a new version fails a unit test.
RULES_DIGEST = "cd46d1ea4e3e9a19ad6b751aa541f88e32528ba5c55245513839530ac0097502"
#: The generated schema, as shipped in the package (read with :mod:`importlib.resources`).
SCHEMA_RESOURCE = "wire.schema.json"

COMPATIBILITY = (
    "Versions are MAJOR.MINOR. A minor version (1.1, 1.2, ...) only adds: an optional field, "
    "an event kind, a looser bound; every batch valid under an earlier 1.x version stays "
    "valid and means the same. A major version changes or removes something. The version "
    "travels in the batch: a batch without a 'version' field, as every batch of version 1 "
    "is, is read as version 1; a later major version will be marked by a 'version' field, "
    "which version 1 workers refuse, so no worker applies a batch of a version it cannot "
    "read. Unknown fields are refused, never ignored: a worker dead-letters an event with a "
    "field or a kind it does not know, and a whole batch with a field beside batch_id and "
    "events, with a reason that names the field (the batch's id is then settled: resending "
    "it changes nothing). So workers are upgraded before producers send what a newer "
    "version adds."
)

#: What each event field means, by name: the same name means the same in every kind but where
#: a ``kind.name`` entry says what it means in that kind (:func:`meaning_key`). Each type's
#: rules come from its ``WithJsonSchema`` in :mod:`sessions.events`.
FIELD_MEANINGS = {
    "kind": (
        "What the event does: create, record or end a session, or add a message to its "
        "conversation (the discriminator)."
    ),
    "session_id": "The session the event belongs to, e.g. user-123.",
    "at": "When it happened, by the producer's clock.",
    "user_id": "The session's owner; sets it when the session has none yet.",
    "metadata": "About the session; sets it when the session has none yet.",
    "message.metadata": "About the message; stored with it and read back with it.",
    "processing_time": "How long the request took.",
    "error": "Whether the request failed (counted in error_count).",
    "counts_request": (
        "Whether the event counts one request; false only adds its time, error, tokens and "
        "cost (the guide's update_session with increment_requests=False)."
    ),
    "input_tokens": "Tokens the request read.",
    "output_tokens": "Tokens the request wrote.",
    "cost": "What the request cost, in the agent's own currency unit.",
    "status": "How the session's run ended.",
    "message_id": (
        "The message's identity, made once by the producer (a random UUID): a message sent "
        "again keeps it, and a batch sent again keeps its messages' ids."
    ),
    "seq": (
        "The message's place in its session's conversation: messages are read in seq order "
        "(then by message_id), whatever order their batches arrive in. The Python client uses "
        "the wall clock in microseconds since 1970, but always past the last seq it wrote or "
        "read for the session."
    ),
    "role": "Who speaks, e.g. user, assistant, system or tool.",
    "content": "What the message says.",
}


def meaning_key(kind: str, name: str) -> str | None:
    """The :data:`FIELD_MEANINGS` entry that says what field ``name`` of ``kind`` events
    means (``kind.name``, else ``name``), or ``None`` if there is none."""
    return next((key for key in (f"{kind}.{name}", name) if key in FIELD_MEANINGS), None)


def shipped_schema_text() -> str:
    """The contract as the package ships it: JSON text (what ``sessions schema`` prints)."""
    return files("sessions").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")


def shipped_schema() -> dict[str, Any]:
    """The contract as the package ships it, decoded."""
    schema: dict[str, Any] = json.loads(shipped_schema_text())
    return schema


class _WireSchema(GenerateJsonSchema):
    """Pydantic's generator, minus what is no JSON Schema (OpenAPI's ``discriminator``: the
    ``kind`` constants tell the events apart) and the titles it makes up for fields."""

    def tagged_union_schema(self, schema: core_schema.TaggedUnionSchema) -> JsonSchemaValue:
        generated = super().tagged_union_schema(schema)
        generated.pop("discriminator", None)
        return generated

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def generate_schema() -> dict[str, Any]:
    """The contract, generated from the models and the pipeline's routing.

    Raises ``LookupError`` when an event field has no entry in :data:`FIELD_MEANINGS` (a
    field added to a model must say what it means on the wire).
    """
    from sessions.decoding import WireBatch
    from sessions.publisher import INGEST_TASK
    from sessions.settings import Settings
    from sessions.worker import config

    batch = WireBatch.model_json_schema(schema_generator=_WireSchema)
    events = batch.pop("$defs")
    for title, definition in events.items():
        # ``kind`` has a default for Python callers; on the wire it is what tells events apart.
        definition["required"] = ["kind", *definition["required"]]
        properties = definition["properties"]
        kind = properties["kind"]["const"]
        keys = {name: meaning_key(kind, name) for name in properties}
        unexplained = sorted(name for name, key in keys.items() if key is None)
        if unexplained:
            raise LookupError(
                f"{title} fields {unexplained}: say what each means in sessions.wire.FIELD_MEANINGS"
            )
        definition["properties"] = {
            name: _described(field, FIELD_MEANINGS[str(keys[name])])
            for name, field in properties.items()
        }
    max_events = Settings.model_fields["store_max_batch_events"].default
    properties = batch["properties"]
    properties["batch_id"] = _described(
        properties["batch_id"],
        "The batch's identity, made once by the producer (a random UUID): the worker applies a "
        "batch id once, so a batch sent again after a failed or doubtful publish must keep its "
        "id (and its events).",
    )
    properties["events"] |= {
        "maxItems": max_events,
        "description": (
            f"The events in the order they were recorded; at most {max_events} (the default of "
            "SESSIONS_STORE_MAX_BATCH_EVENTS: a longer batch is dead-lettered whole). An "
            "invalid event is dead-lettered with its reason; the others are applied."
        ),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:agent-sessions:wire:{WIRE_VERSION}",
        "title": f"agent-sessions wire contract {WIRE_VERSION}: one batch of session events",
        "description": (
            f"One batch of session events, the single argument of the Celery task {INGEST_TASK} "
            "($defs/Task says how it travels). Fields whose description says 'checked by the "
            f"worker only' have rules JSON Schema cannot express. {COMPATIBILITY}"
        ),
        "$comment": (
            "Generated from sessions/events.py and sessions/decoding.py by "
            "`python -m sessions.wire`."
        ),
        "type": "object",
        "properties": properties,
        "required": batch["required"],
        "additionalProperties": False,
        "$defs": {**events, "Task": _task(INGEST_TASK, config)},
    }


def _described(field: dict[str, Any], meaning: str) -> dict[str, Any]:
    """``field`` with ``meaning`` before the description its type gave it, if any."""
    rule = field.get("description") or next(
        (choice["description"] for choice in field.get("anyOf", ()) if "description" in choice),
        None,
    )
    return {**field, "description": f"{meaning} {rule}" if rule else meaning}


def _task(name: str, config: Any) -> dict[str, Any]:
    """The Celery task message that carries a batch, as a client's ``send_task`` takes it."""
    return {
        "description": (
            "How a batch travels: these are the arguments of a Celery client's send_task. The "
            "message is Celery's task message, protocol 2 "
            "(https://docs.celeryq.dev/en/stable/internals/protocol.html): headers.task is the "
            "task's name and headers.id a new id per message; the body is the JSON array "
            "[args, kwargs, {}], content type application/json, content encoding utf-8. On "
            "Redis it is pushed onto the list named by the queue (what publishing to the "
            "exchange with the routing key amounts to in kombu's Redis transport). On RabbitMQ "
            "it is published, persistent, to the exchange with the routing key, or to the "
            "default exchange with the queue's name; the workers declare the queue (a quorum "
            "queue), producers do not."
        ),
        "type": "object",
        "properties": {
            "task": {"const": name},
            "queue": {"const": config.EVENTS_QUEUE},
            "exchange": {"const": config.EXCHANGE},
            "routing_key": {"const": config.task_routes[name]["routing_key"]},
            "content_type": {"const": "application/json"},
            "args": {
                "type": "array",
                "prefixItems": [
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#"},
                        "description": "The batch as one JSON text.",
                    }
                ],
                "items": False,
                "minItems": 1,
            },
            "kwargs": {"type": "object", "maxProperties": 0},
        },
        "required": ["task", "queue", "exchange", "routing_key", "content_type", "args", "kwargs"],
        "additionalProperties": False,
    }


def render(schema: dict[str, Any]) -> str:
    """``schema`` as the shipped file holds it: indented JSON text ending in a newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


#: Keywords that carry prose only: changing them changes no rule.
PROSE = frozenset({"title", "description", "$comment", "$id"})
#: Keywords whose value maps names (of fields, of definitions) to schemas.
NAMED_SCHEMAS = frozenset({"properties", "$defs", "patternProperties", "dependentSchemas"})


def rules_digest(schema: dict[str, Any]) -> str:
    """SHA-256 of ``schema`` without its prose (:data:`PROSE`): what a message must be."""

    def rules(value: Any) -> Any:
        if isinstance(value, list):
            return [rules(item) for item in value]
        if not isinstance(value, dict):
            return value
        kept: dict[str, Any] = {}
        for key, item in value.items():
            if key in NAMED_SCHEMAS and isinstance(item, dict):
                kept[key] = {name: rules(each) for name, each in item.items()}
            elif key not in PROSE:
                kept[key] = rules(item)
        return kept

    text = json.dumps(rules(schema), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


if __name__ == "__main__":  # pragma: no cover - regenerates the shipped file
    sys.stdout.write(render(generate_schema()))
