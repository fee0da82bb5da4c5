"""What an agent says about a session: four kinds of event, carried in immutable batches.

Everything that reaches the store is a :data:`SessionEvent`. Events travel in a
:class:`Batch` whose ``batch_id`` the producer makes once; retries, redelivery and replay
all carry the same id, which is what makes the store's apply idempotent.

Validation errors name the field and the rule (pydantic's ``loc`` plus our message), so a
dead-lettered event says exactly why it was refused.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

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

#: Session and user ids: printable ASCII without whitespace, as in ``user-456-device-789``.
ID_PATTERN = re.compile(r"[!-~]{1,255}")
#: Longest accepted processing time for one request (one day).
MAX_PROCESSING_TIME = 86_400.0
#: Largest accepted cost of one request: far above any real one, and small enough that no
#: sum of them in a session can overflow to infinity.
MAX_COST = 1e9
#: Largest accepted token count of one request, in or out: far above any model's context
#: window (the largest hold about 10**7 tokens), and small enough that a session's sum stays
#: within a BIGINT for more than 9 * 10**9 such requests (as ``MAX_COST`` keeps cost finite).
MAX_TOKENS = 10**9
#: Largest accepted metadata object, serialized as compact JSON.
MAX_METADATA_BYTES = 16 * 1024
#: Deepest accepted nesting of objects and arrays in metadata, the metadata object itself
#: being level 1: ample for structured metadata, far below the depths at which pydantic's
#: serializer (255) and Python's JSON codec (about 990: the recursion limit) give up.
MAX_METADATA_DEPTH = 32
#: How far in the future an event's ``at`` may lie (producer clocks drift a little).
MAX_CLOCK_SKEW = timedelta(minutes=5)
#: The earliest accepted ``at``: before any agent recorded a session, and a time every
#: database and every timezone offset can represent (year 1 plus an offset cannot be).
MIN_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)
#: The states an ``end`` event may put a session in.
EndStatus = Literal["completed", "failed", "expired"]


#: Ids that passed :func:`_check_id` lately, each with its JSON form: agents record into the
#: same few sessions over and over, and a lookup costs a fraction of the pattern match
#: (bounded: forgotten all at once when full).
_valid_ids: dict[str, str] = {}
VALID_IDS_REMEMBERED = 8192


def _check_id(value: str) -> str:
    if value in _valid_ids:
        return value
    if not ID_PATTERN.fullmatch(value):
        raise ValueError("must be 1 to 255 printable ASCII characters without whitespace")
    if len(_valid_ids) >= VALID_IDS_REMEMBERED:
        _valid_ids.clear()
    _valid_ids[value] = json.dumps(value)
    return value


#: A past value of ``now + MAX_CLOCK_SKEW``. The true limit only grows, so a time at or
#: before this one is certainly accepted; only a later one pays for reading the clock.
_at_limit = datetime.min.replace(tzinfo=UTC)


_TOO_EARLY = f"must not lie before {MIN_EVENT_TIME:%Y-%m-%dT%H:%M:%SZ}"
_TOO_LATE = "must not lie more than 5 minutes in the future"


def _check_at(value: datetime) -> datetime:
    global _at_limit
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00: no year 0 to normalise to
            early = value.year < MIN_EVENT_TIME.year
            raise ValueError(_TOO_EARLY if early else _TOO_LATE) from None
    if value < MIN_EVENT_TIME:
        raise ValueError(_TOO_EARLY)
    if value > _at_limit:
        _at_limit = datetime.now(UTC) + MAX_CLOCK_SKEW
        if value > _at_limit:
            raise ValueError(_TOO_LATE)
    return value


def _check_processing_time(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_PROCESSING_TIME:
        raise ValueError(f"must be a finite number of seconds from 0 to {MAX_PROCESSING_TIME:g}")
    return value


def _check_cost(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_COST:
        raise ValueError(f"must be a finite number from 0 to {MAX_COST:g}")
    return value


def _refuse_numbers(value: Any) -> Any:
    """An event time is ISO 8601 text or a datetime: a bare number is ambiguous (seconds or
    milliseconds since when?) and is refused rather than guessed."""
    if isinstance(value, int | float):
        raise ValueError("must be an ISO 8601 date-time with a timezone, not a number")
    return value


def _text_problem(text: str) -> str | None:
    """What keeps ``text`` out of a JSON document every database stores, if anything."""
    if "\x00" in text:
        return "must not contain a NUL character (\\x00: PostgreSQL cannot store it in JSON)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return (
                "must not contain a lone surrogate (such as \\udcff from a surrogate-escaped "
                "file name: it is no Unicode character, and JSON text cannot carry it)"
            )
    return None


#: Where a value sits in metadata, for an error message: ``(parent, key)`` links, formatted
#: only when something is refused (most metadata is refused by nothing).
_Where = tuple["_Where", Any] | None


def _place(where: _Where) -> str:
    keys: list[Any] = []
    while where is not None:
        where, key = where
        keys.append(key)
    return "metadata" + "".join(f"[{key!r}]" for key in reversed(keys))


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    """Why ``metadata`` cannot be stored as it is, or ``None``: nested deeper than
    :data:`MAX_METADATA_DEPTH`, or holding text no JSON document can (:func:`_text_problem`).

    A loop over an explicit stack, not recursion: a deep (or cyclic) object must cost a
    refusal, not a ``RecursionError``; it stops at the first level beyond the bound.
    """
    stack: list[tuple[Any, int, _Where]] = [(metadata, 1, None)]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                return f"{problem} (at {_place(where)})"
            continue
        if not isinstance(value, dict | list | tuple):
            continue
        if depth > MAX_METADATA_DEPTH:
            return (
                f"must be nested at most {MAX_METADATA_DEPTH} levels deep (objects and arrays, "
                f"counting the metadata object; deeper at {_place(where)})"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                problem = _text_problem(key) if isinstance(key, str) else None
                if problem:
                    return f"{problem} (in a key of {_place(where)})"
                stack.append((item, depth + 1, (where, key)))
        else:
            stack.extend((item, depth + 1, (where, index)) for index, item in enumerate(value))
    return None


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as checked, a copy of its own: read back from the JSON text it was measured
    by, so that a caller changing its dict (or a list in it) afterwards cannot change what was
    accepted, nor slip past these rules before the event is sent; tuples become lists and
    keys text, as the wire carries them."""
    problem = _metadata_problem(value)
    if problem:
        raise ValueError(problem)
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be a JSON object ({exc})") from None
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON (got {size})")
    frozen: dict[str, Any] = json.loads(text)
    return frozen


#: A UUID in its canonical, hyphenated form, as the wire contract asks for the ids a producer
#: makes (the validator also reads other forms, which producers should not rely on).
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
#: An RFC 3339 date-time with an offset, as the wire contract asks for ``at`` (the validator
#: also reads other ISO 8601 forms, which producers in other languages should not rely on).
RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]"
    r":[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)

# Each type's ``WithJsonSchema`` is what its validators accept, in JSON Schema's words and,
# where those cannot say it, in its description: the wire contract (sessions/wire.py,
# ``sessions schema``) is generated from these models. It changes no validation;
# tests/unit/test_wire_schema.py checks that the schema and the validators agree.
SessionId = Annotated[
    str,
    AfterValidator(_check_id),
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
    BeforeValidator(_refuse_numbers),
    AfterValidator(_check_at),
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
    AfterValidator(_check_processing_time),
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
    AfterValidator(_check_cost),
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
    AfterValidator(_check_metadata),
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


#: Longest message content, in bytes of UTF-8 (an LLM answer of some 16,000 tokens).
MAX_MESSAGE_BYTES = 64 * 1024
#: Message roles: ``user``, ``assistant``, ``system``, ``tool`` and the like.
ROLE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
#: Largest message sequence number (a signed 64-bit column).
MAX_SEQ = 2**63 - 1


def _check_role(value: str) -> str:
    if not ROLE_PATTERN.fullmatch(value):
        raise ValueError("must be 1 to 32 lowercase letters, digits, '_' or '-', from a letter")
    return value


def check_storable(text: str, max_bytes: int, form: str, nul: str = "\x00") -> str:
    """``text`` if a database text (or JSON) column can take it: no ``nul`` (NUL, or its
    JSON escape), no lone surrogate, at most ``max_bytes`` as UTF-8 (``form`` names how
    it is measured); else :class:`ValueError` naming the rule, so that it is refused here
    rather than dead-lettered by the worker."""
    if nul in text:
        raise ValueError("must not contain NUL characters")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    if size > max_bytes:
        raise ValueError(f"must be at most {max_bytes} bytes {form} (got {size})")
    return text


def _check_content(value: str) -> str:
    return check_storable(value, MAX_MESSAGE_BYTES, "as UTF-8")


Role = Annotated[
    str,
    AfterValidator(_check_role),
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
    AfterValidator(_check_content),
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
    parses the JSON itself). ``batch_id`` comes first, so :func:`peek_batch_id` finds it
    without parsing.
    """
    return to_json(message).decode()


_BATCH_ID_PREFIX = re.compile(r'\{\s*"batch_id"\s*:\s*"([^"\\]{1,64})"')


def peek_batch_id(payload: Any) -> str | None:
    """The ``batch_id`` a payload claims (for logs), without decoding the whole of it."""
    if isinstance(payload, dict):
        value = payload.get("batch_id")
        return None if value is None else str(value)
    if isinstance(payload, str):
        found = _BATCH_ID_PREFIX.match(payload)
        return found.group(1) if found else None
    return None


def claimed_batch_uuid(payload: Any) -> uuid.UUID | None:
    """The batch id a payload claims, if it is a UUID (what the ledger settles it under)."""
    claimed = peek_batch_id(payload)
    try:
        return None if claimed is None else uuid.UUID(claimed)
    except ValueError:
        return None


#: A ``record`` event as the client keeps it until it is sent, already validated:
#: ``(session_id, at, user_id, processing_time, error, counts_request, input_tokens,
#: output_tokens, cost)``. A tuple of plain values costs the agent far less than a model
#: (to make, and to the garbage collector while it waits in the buffer).
RecordFields = tuple[str, datetime, str | None, float, bool, bool, int, int, float]


def _checked_id(value: str) -> bool:
    """Whether the id rule accepts ``value`` (remembered in ``_valid_ids`` if so).

    A new id is checked here rather than left to the model, so that an agent's first
    ``record`` of each session does not build :class:`RecordEvent`'s validator either.
    """
    try:
        _check_id(value)
    except ValueError:
        return False
    return True


def plain_record(
    session_id: str,
    processing_time: float,
    error: bool,
    user_id: str | None,
    counts_request: bool,
    input_tokens: int,
    output_tokens: int,
    cost: float,
) -> RecordFields | None:
    """The fields of a ``record`` event made now, if they are plainly valid; else ``None``.

    "Plainly": ids the id rule accepts, and values of exactly the types the model takes
    without conversion, within its bounds. Anything else (a new id, a string for a number,
    NaN, a bool for an int, ...) gets ``None``: the caller then builds a :class:`RecordEvent`,
    which accepts or refuses it with the field and rule named. So this never accepts what
    the model would refuse, and yields the values the model would hold.
    """
    if (
        type(session_id) is str
        and (session_id in _valid_ids or _checked_id(session_id))
        and (
            user_id is None
            or (type(user_id) is str and (user_id in _valid_ids or _checked_id(user_id)))
        )
        and type(processing_time) in (float, int)
        and 0 <= processing_time <= MAX_PROCESSING_TIME
        and type(error) is bool
        and type(counts_request) is bool
        and type(input_tokens) is int
        and 0 <= input_tokens <= MAX_TOKENS
        and type(output_tokens) is int
        and 0 <= output_tokens <= MAX_TOKENS
        and type(cost) in (float, int)
        and 0 <= cost <= MAX_COST
    ):
        return (
            session_id,
            datetime.now(UTC),
            user_id,
            float(processing_time),
            error,
            counts_request,
            input_tokens,
            output_tokens,
            float(cost),
        )
    return None


def event_json(item: AnyEvent | RecordFields) -> str:
    """One event as compact JSON, as :func:`~sessions.decoding.decode_batch` reads it.

    Fields at their default are left out of a :data:`RecordFields` event (the model fills
    them in), except ``processing_time`` and ``error``.
    """
    if not isinstance(item, tuple):
        return item.model_dump_json()
    session_id, at, user_id, seconds, error, counts_request, tokens_in, tokens_out, cost = item
    text = (
        f'{{"kind":"record","session_id":{_valid_ids.get(session_id) or json.dumps(session_id)}'
        f',"at":"{at.isoformat()}","processing_time":{seconds!r}'
        f',"error":{"true" if error else "false"}'
    )
    if user_id is not None:
        text += f',"user_id":{_valid_ids.get(user_id) or json.dumps(user_id)}'
    if not counts_request:
        text += ',"counts_request":false'
    if tokens_in:
        text += f',"input_tokens":{tokens_in}'
    if tokens_out:
        text += f',"output_tokens":{tokens_out}'
    if cost:
        text += f',"cost":{cost!r}'
    return text + "}"


def batch_json(batch_id: uuid.UUID, items: Sequence[AnyEvent | RecordFields]) -> str:
    """A batch's wire form (see :func:`encode_message`), made straight from its events.

    Raises (``PydanticSerializationError``, say) when an event cannot be serialised, which
    the model's validation rules out; :func:`serializable` tells such events apart.
    """
    return f'{{"batch_id":"{batch_id}","events":[{",".join(map(event_json, items))}]}}'


Item = TypeVar("Item", bound=AnyEvent | RecordFields)


def serializable(items: Sequence[Item]) -> tuple[list[Item], list[tuple[Item, str]]]:
    """``items`` split into those :func:`event_json` serialises and those it cannot, each with
    the reason (for a batch :func:`batch_json` could not make: one bad event must cost only
    itself)."""
    good: list[Item] = []
    bad: list[tuple[Item, str]] = []
    for item in items:
        try:
            event_json(item)
        except Exception as exc:  # whatever the serializer raises, the event is at fault
            bad.append((item, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
        else:
            good.append(item)
    return good, bad


def record_event(fields: RecordFields) -> RecordEvent:
    """The model of a :data:`RecordFields` event."""
    session_id, at, user_id, seconds, error, counts_request, tokens_in, tokens_out, cost = fields
    return RecordEvent(
        session_id=session_id,
        at=at,
        user_id=user_id,
        processing_time=seconds,
        error=error,
        counts_request=counts_request,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost=cost,
    )
