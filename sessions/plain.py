"""Events as the client keeps them until they are sent: plain values, and their wire text.

An agent's ``record``, ``create`` and ``end`` with plainly valid arguments (nearly every
call) are kept as plain values checked by :mod:`sessions.rules`, and turned into the batch's
JSON text here, without a model: an agent that records never imports pydantic (its import is
about a sixth of an agent's start-up, README "Agent start-up"). Anything else goes through the
models of :mod:`sessions.events`, which convert it or refuse it with the field and rule named;
this module never accepts what they would refuse, and its text decodes to the events they would
hold (``tests/unit/test_events.py``).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sessions.rules import (
    END_STATUSES,
    MAX_COST,
    MAX_PROCESSING_TIME,
    MAX_TOKENS,
    MIN_EVENT_TIME,
    EndStatus,
    check_id,
    check_metadata,
    valid_ids,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    from sessions.events import AnyEvent, RecordEvent

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


@dataclass(frozen=True, slots=True)
class PlainCreate:
    """A ``create`` event as the client keeps it until it is sent, already validated
    (``metadata`` is the copy :func:`~sessions.rules.check_metadata` made)."""

    session_id: str
    at: datetime
    user_id: str | None
    metadata: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PlainEnd:
    """An ``end`` event as the client keeps it until it is sent, already validated."""

    session_id: str
    at: datetime
    status: EndStatus


if TYPE_CHECKING:
    #: What a client's buffer holds: plain values, or a model (for the arguments that needed
    #: one to be converted: a time given, a message).
    Buffered: TypeAlias = AnyEvent | RecordFields | PlainCreate | PlainEnd


def _checked_id(value: str) -> bool:
    """Whether the id rule accepts ``value`` (remembered in ``valid_ids`` if so).

    A new id is checked here rather than left to the model, so that an agent's first
    ``record`` of each session does not import the models either.
    """
    try:
        check_id(value)
    except ValueError:
        return False
    return True


def plain_ids(session_id: object, user_id: object) -> bool:
    """Whether ``session_id`` is a ``str`` the id rule accepts, and ``user_id`` is ``None``
    or one too (what the client checks of its arguments, and the worker of a plain record)."""
    return (
        type(session_id) is str
        and (session_id in valid_ids or _checked_id(session_id))
        and (
            user_id is None
            or (type(user_id) is str and (user_id in valid_ids or _checked_id(user_id)))
        )
    )


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
    NaN, a bool for an int, ...) gets ``None``: the caller then builds a
    :class:`~sessions.events.RecordEvent`,
    which accepts or refuses it with the field and rule named. So this never accepts what
    the model would refuse, and yields the values the model would hold.
    """
    if (
        plain_ids(session_id, user_id)
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


def plain_create(
    session_id: str, user_id: str | None, metadata: dict[str, Any] | None
) -> PlainCreate | None:
    """A ``create`` event made now, if its arguments are plainly valid; else ``None`` (the
    caller then builds a :class:`~sessions.events.CreateEvent`, which converts or refuses
    them), as :func:`plain_record` does."""
    if (
        plain_ids(session_id, user_id)
        # The model takes a dict with str keys (at its top; check_metadata makes text of
        # the keys below, as JSON does) and refuses any other key.
        and (metadata is None or (type(metadata) is dict and all(type(k) is str for k in metadata)))
    ):
        if metadata is not None:
            try:
                metadata = check_metadata(metadata)
            except ValueError:
                return None  # the model refuses it, naming the field
        now = datetime.now(UTC)
        if now < MIN_EVENT_TIME:  # a clock before 2000: the model refuses the time, as before
            return None
        return PlainCreate(session_id, now, user_id, metadata)
    return None


def plain_end(session_id: str, status: str) -> PlainEnd | None:
    """An ``end`` event made now, if its arguments are plainly valid; else ``None``."""
    if plain_ids(session_id, None) and type(status) is str and status in END_STATUSES:
        now = datetime.now(UTC)
        if now < MIN_EVENT_TIME:  # a clock before 2000: the model refuses the time, as before
            return None
        return PlainEnd(session_id, now, cast("EndStatus", status))
    return None


def _id_json(value: str) -> str:
    return valid_ids.get(value) or json.dumps(value)


def event_json(item: Buffered) -> str:
    """One event as compact JSON, as :func:`~sessions.decoding.decode_batch` reads it.

    Fields at their default are left out of a plain event (the model fills them in), except
    a ``record``'s ``processing_time`` and ``error``. Metadata is written as
    :func:`~sessions.rules.check_metadata` measured it, but with characters beyond ASCII as
    themselves, as the model's serializer writes them.
    """
    if isinstance(item, tuple):  # a record: nearly every event
        return _record_json(item)
    if isinstance(item, PlainCreate):
        text = (
            f'{{"kind":"create","session_id":{_id_json(item.session_id)}'
            f',"at":"{item.at.isoformat()}"'
        )
        if item.user_id is not None:
            text += f',"user_id":{_id_json(item.user_id)}'
        if item.metadata is not None:
            metadata = json.dumps(item.metadata, separators=(",", ":"), ensure_ascii=False)
            if not metadata.isascii():
                metadata.encode()  # a lone surrogate the rules let through (a bug) raises here
            text += f',"metadata":{metadata}'
        return text + "}"
    if isinstance(item, PlainEnd):
        return (
            f'{{"kind":"end","session_id":{_id_json(item.session_id)}'
            f',"at":"{item.at.isoformat()}","status":"{item.status}"}}'
        )
    return item.model_dump_json()


def _record_json(fields: RecordFields) -> str:
    session_id, at, user_id, seconds, error, counts_request, tokens_in, tokens_out, cost = fields
    text = (
        f'{{"kind":"record","session_id":{_id_json(session_id)}'
        f',"at":"{at.isoformat()}","processing_time":{seconds!r}'
        f',"error":{"true" if error else "false"}'
    )
    if user_id is not None:
        text += f',"user_id":{_id_json(user_id)}'
    if not counts_request:
        text += ',"counts_request":false'
    if tokens_in:
        text += f',"input_tokens":{tokens_in}'
    if tokens_out:
        text += f',"output_tokens":{tokens_out}'
    if cost or math.copysign(1.0, cost) < 0:  # -0.0 is what the model would hold: say it
        text += f',"cost":{cost!r}'
    return text + "}"


def batch_json(batch_id: uuid.UUID, items: Sequence[Buffered]) -> str:
    """A batch's wire form (see :func:`sessions.events.encode_message`), made straight from
    its events.

    Raises (``PydanticSerializationError``, say) when an event cannot be serialised, which
    the rules rule out; :func:`serializable` tells such events apart.
    """
    return f'{{"batch_id":"{batch_id}","events":[{",".join(map(event_json, items))}]}}'


Item = TypeVar("Item", bound="Buffered")


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


def as_model(item: Buffered) -> AnyEvent:
    """The event model of a buffered event (what an ``on_unsent`` handler is given).

    Imports the models (and pydantic): only for a batch that could not be published, or a test.
    """
    from sessions.events import CreateEvent, EndEvent

    if isinstance(item, PlainCreate):
        return CreateEvent(
            session_id=item.session_id, at=item.at, user_id=item.user_id, metadata=item.metadata
        )
    if isinstance(item, PlainEnd):
        return EndEvent(session_id=item.session_id, at=item.at, status=item.status)
    if isinstance(item, tuple):
        return record_event(item)
    return item  # already a model


def record_event(fields: RecordFields) -> RecordEvent:
    """The model of a :data:`RecordFields` event."""
    from sessions.events import RecordEvent

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
