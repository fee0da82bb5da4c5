"""What an agent says about a session: four kinds of event, carried in immutable batches.

Everything that reaches the store is a :data:`SessionEvent`. Events travel in a
:class:`Batch` whose ``batch_id`` the producer makes once; retries, redelivery and replay
all carry the same id, which is what makes the store's apply idempotent.

Validation errors name the field and the rule (pydantic's ``loc`` plus our message), so a
dead-lettered event says exactly why it was refused.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    WithJsonSchema,
)
from pydantic_core import to_json

from sessions.rules import (
    ID_PATTERN,
    MAX_CLOCK_SKEW,
    MAX_COST,
    MAX_MESSAGE_BYTES,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_PROCESSING_TIME,
    MAX_SEQ,
    MAX_TOKENS,
    MIN_EVENT_TIME,
    RFC3339_PATTERN,
    ROLE_PATTERN,
    UUID_PATTERN,
    EndStatus,
    check_at,
    check_content,
    check_cost,
    check_id,
    check_metadata,
    check_processing_time,
    check_role,
    refuse_numbers,
)

# Each type's ``WithJsonSchema`` is what its validators accept, in JSON Schema's words and,
# where those cannot say it, in its description: the wire contract (sessions/wire.py,
# ``sessions schema``) is generated from these models. It changes no validation;
# tests/unit/test_wire_schema.py checks that the schema and the validators agree.
SessionId = Annotated[
    str,
    AfterValidator(check_id),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^{ID_PATTERN.pattern}$",
            "description": "Printable ASCII without whitespace, 1 to 255 characters.",
        }
    ),
]
EventTime = Annotated[
    AwareDatetime,
    BeforeValidator(refuse_numbers),
    AfterValidator(check_at),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "pattern": RFC3339_PATTERN,
            "description": (
                "An RFC 3339 date-time with an offset (Z or +hh:mm) on a real calendar date; "
                f"not before {MIN_EVENT_TIME:%Y-%m-%dT%H:%M:%SZ} and at most "
                f"{MAX_CLOCK_SKEW.total_seconds() / 60:g} minutes ahead of the worker's clock "
                "(checked by the worker only)."
            ),
        }
    ),
]
#: Numbers must be numbers: a numeric string is refused, not converted (``Strict``).
ProcessingTime = Annotated[
    float,
    Strict(),
    AfterValidator(check_processing_time),
    WithJsonSchema(
        {
            "type": "number",
            "minimum": 0,
            "maximum": MAX_PROCESSING_TIME,
            "description": "In seconds.",
        }
    ),
]
Cost = Annotated[
    float,
    Strict(),
    AfterValidator(check_cost),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": MAX_COST}),
]


def _count_schema(maximum: int) -> WithJsonSchema:
    """The wire contract's words for a ``StrictInt`` from 0 to ``maximum``."""
    return WithJsonSchema(
        {
            "type": "integer",
            "minimum": 0,
            "maximum": maximum,
            "description": (
                "Written as an integer: 1000, not 1000.0 or 1e3 (checked by the worker only: "
                "JSON Schema counts 1000.0 as an integer)."
            ),
        }
    )


TokenCount = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS), _count_schema(MAX_TOKENS)]
Metadata = Annotated[
    dict[str, Any],
    AfterValidator(check_metadata),
    WithJsonSchema(
        {
            "type": "object",
            "description": (
                f"Any JSON object, at most {MAX_METADATA_BYTES} bytes as compact JSON (no "
                "spaces after , and :, every character beyond ASCII written as a \\u escape), "
                f"nested at most {MAX_METADATA_DEPTH} levels deep (objects and arrays, counting "
                "this object), with no NUL character and no lone surrogate in any string or "
                "key (checked by the worker only)."
            ),
        }
    ),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    # defer_build, here and on every model of this module: an agent that only records never
    # validates one (``plain_record`` checks its fields by hand), so the validators are built
    # on first use instead of at import: some 20 ms of an agent's start-up
    # (bench/client_start.py). A worker builds them before its pool forks (build_models).
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    session_id: SessionId
    #: When it happened, by the producer's clock (aware, normalised to UTC).
    at: EventTime


class CreateEvent(_Event):
    """Start a session (or a new run of an ended one) with its owner and metadata."""

    kind: Literal["create"] = "create"
    user_id: SessionId | None = None
    metadata: Metadata | None = None


class RecordEvent(_Event):
    """One request served: counts one request, its time, and whether it failed."""

    kind: Literal["record"] = "record"
    user_id: SessionId | None = None
    processing_time: ProcessingTime = 0.0
    error: StrictBool = False
    #: Whether the event counts a request; the guide's ``update_session`` may add time or
    #: an error without one (``increment_requests=False``).
    counts_request: StrictBool = True
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cost: Cost = 0.0


class EndEvent(_Event):
    """End the session's current run with a final status."""

    kind: Literal["end"] = "end"
    status: EndStatus = "completed"


Role = Annotated[
    str,
    AfterValidator(check_role),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^{ROLE_PATTERN.pattern}$",
            "description": "1 to 32 lowercase letters, digits, '_' or '-', from a letter.",
        }
    ),
]
MessageContent = Annotated[
    str,
    Strict(),
    AfterValidator(check_content),
    WithJsonSchema(
        {
            "type": "string",
            # A character is at least one byte of UTF-8: a looser bound JSON Schema can state.
            "maxLength": MAX_MESSAGE_BYTES,
            "pattern": "^[^\\u0000]*$",
            "description": (
                f"Text without a NUL character, at most {MAX_MESSAGE_BYTES} bytes as UTF-8, with "
                "no lone surrogate such as \\udcff (checked by the worker only: maxLength counts "
                "characters, and a JSON string can escape a lone surrogate)."
            ),
        }
    ),
]
MessageSeq = Annotated[StrictInt, Field(ge=0, le=MAX_SEQ), _count_schema(MAX_SEQ)]
#: An id its producer makes once (a random UUID), such as a message's.
ProducerId = Annotated[
    uuid.UUID, WithJsonSchema({"type": "string", "format": "uuid", "pattern": UUID_PATTERN})
]


class MessageEvent(_Event):
    """One message of a session's conversation: a user's turn, an assistant's answer, ...

    Its place (seq) and its identity (message_id) are made by its producer; the Python
    client's seq is a hybrid logical clock (sessions/conversation.py).
    """

    # No default: made up while decoding, a message's id would differ at each delivery of its
    # batch, whose content the ledger would then see change under one batch id.

    kind: Literal["message"] = "message"
    message_id: ProducerId
    seq: MessageSeq
    role: Role
    content: MessageContent
    metadata: Metadata | None = None


#: Every kind of event.
AnyEvent = CreateEvent | RecordEvent | EndEvent | MessageEvent
SessionEvent = Annotated[AnyEvent, Field(discriminator="kind")]


class Batch(BaseModel):
    """An immutable group of events, in recorded order, under one producer-made id."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    batch_id: ProducerId = Field(default_factory=uuid.uuid4)
    events: tuple[SessionEvent, ...]

    def to_message(self) -> dict[str, Any]:
        """The JSON-ready form: ``{"batch_id": ..., "events": [{...}, ...]}``.

        What the spool keeps and a publisher is handed; :func:`encode_message` turns it into
        the text that travels through the broker.
        """
        message: dict[str, Any] = self.model_dump(mode="json")  # one call, not one per event
        return message


def encode_message(message: dict[str, Any]) -> str:
    """A batch's wire form: its message as one compact JSON text.

    Carried as the task's single string argument, it is decoded by the broker client as one
    string (not hundreds of objects), passed to a pool process as one string, and parsed and
    validated in a single call by :func:`~sessions.decoding.decode_batch` (pydantic-core
    parses the JSON itself). ``batch_id`` comes first, so :func:`sessions.plain.peek_batch_id`
    finds it without parsing.
    """
    return to_json(message).decode()
