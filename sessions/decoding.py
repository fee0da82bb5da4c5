"""How a worker reads a batch off the wire: event by event, so one bad event costs no other data.

An agent never decodes (it only writes batches, :mod:`sessions.plain`), so these models and
the event adapter live here: an agent that records never creates them (its start-up is
measured by bench/client_start.py), unless it confirms through the ledger, whose store
decodes. :func:`build_models` builds every validator before a
worker's pool forks. :func:`read_batch` is what the store applies: a batch of plain records
read without models (:mod:`sessions.wire_records`), any other by :func:`decode_batch`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from sessions import deep_json
from sessions.events import (
    AnyEvent,
    Batch,
    CreateEvent,
    EndEvent,
    MessageEvent,
    ProducerId,
    RecordEvent,
    SessionEvent,
)
from sessions.wire_records import WireRecord, read_records

#: An event as decoded: a model, or a plain record read without one (the apply reads both).
DecodedEvent = AnyEvent | WireRecord
#: A ``record`` event as decoded: its model, or the same values read without one.
Record = RecordEvent | WireRecord
#: The same, for ``isinstance`` (a tuple of classes is the quickest form to test).
RECORDS = (RecordEvent, WireRecord)

_event_adapter: TypeAdapter[AnyEvent] = TypeAdapter(
    SessionEvent, config=ConfigDict(defer_build=True)
)


class WireBatch(Batch):
    """A batch as wire input must carry it: with the id its producer made.

    A Python caller may leave :class:`~sessions.events.Batch`'s id to its default; made up
    while decoding, it would differ at every delivery of the same message, which would be
    applied again at each. The wire contract (sessions/wire.py) is generated from this model.
    """

    batch_id: ProducerId


class RejectedEvent(BaseModel):
    """An event (or a whole payload) that cannot be applied, and why."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    payload: Any
    reason: str


class DecodedBatch(BaseModel):
    """A batch payload split into what can be applied and what must be dead-lettered.

    ``batch_id`` is ``None`` when the envelope itself is unusable; then every part of the
    payload is in ``rejected`` and nothing is applied (there is no id to dedupe by).
    """

    model_config = ConfigDict(frozen=True, defer_build=True)

    batch_id: uuid.UUID | None
    events: tuple[DecodedEvent, ...] = ()
    rejected: tuple[RejectedEvent, ...] = ()


def build_models() -> None:
    """Build every model's validator and serializer now, instead of at its first use.

    A Celery worker calls it before its pool forks, so each pool process shares one copy
    instead of building its own at its first batch.
    """
    models: tuple[type[BaseModel], ...] = (
        CreateEvent,
        RecordEvent,
        EndEvent,
        MessageEvent,
        Batch,
        WireBatch,
        RejectedEvent,
        DecodedBatch,
    )
    for model in models:
        model.model_rebuild()
    _event_adapter.rebuild()


def describe_error(error: ValidationError) -> str:
    """``field: rule`` for each problem, e.g. ``processing_time: must be a finite number``."""
    parts = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"]) or "event"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def parse_event(payload: Any) -> AnyEvent:
    """Validate one event from its wire form; raises :class:`ValidationError`."""
    return _event_adapter.validate_python(payload)


def read_batch(payload: Any, max_events: int) -> DecodedBatch:
    """:func:`decode_batch`, but a text of plain ``record`` events only (nearly every batch a
    tracker sends) is read into :class:`~sessions.wire_records.WireRecord` tuples, without
    models: the same events and values, in a fraction of the memory
    (:mod:`sessions.wire_records`)."""
    if isinstance(payload, str | bytes):
        read = read_records(payload, max_events)
        if read is not None:
            batch_id, records = read
            return DecodedBatch.model_construct(batch_id=batch_id, events=records)
    return decode_batch(payload, max_events)


def decode_batch(payload: Any, max_events: int) -> DecodedBatch:
    """Validate a wire payload event by event, so one bad event costs no other data.

    ``payload`` is a :class:`~sessions.events.Batch`, its message (a dict) or the message's
    JSON text (:func:`~sessions.events.encode_message`). A text is first validated whole, in
    one call; only if that fails is it decoded and validated event by event, for the exact
    reason of each refusal.
    Both ways apply the same models and validators, so they accept the same events.
    """
    if isinstance(payload, Batch):
        # Its events are validated models already (a Batch is made only by validating).
        return DecodedBatch.model_construct(batch_id=payload.batch_id, events=payload.events)
    if isinstance(payload, str | bytes):
        return _decode_text(payload, max_events)
    if not isinstance(payload, dict):
        return _reject_whole(payload, f"batch: must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"batch_id", "events"})
    if unknown:
        return _reject_whole(payload, f"batch: unexpected fields {unknown}")
    try:
        batch_id = uuid.UUID(str(payload["batch_id"]))
    except (KeyError, ValueError):
        return _reject_whole(payload, "batch_id: must be a UUID")
    raw_events = payload.get("events")
    if not isinstance(raw_events, list):
        return _reject_whole(payload, "events: must be a list")
    if len(raw_events) > max_events:
        return _reject_whole(
            payload, f"events: at most {max_events} events per batch (got {len(raw_events)})"
        )
    events: list[AnyEvent] = []
    rejected: list[RejectedEvent] = []
    for index, raw in enumerate(raw_events):
        try:
            events.append(parse_event(raw))
        except ValidationError as exc:
            rejected.append(
                RejectedEvent(payload=raw, reason=f"events[{index}]: {describe_error(exc)}")
            )
        except Exception as exc:  # a validator's bug: the event is the unit
            # Validators raise ``ValueError`` (a refusal naming the field); anything else
            # escaping one must cost this event, not the batch (nor a retry of it).
            reason = f"events[{index}]: cannot be validated: {type(exc).__name__}: {exc}"
            rejected.append(RejectedEvent(payload=raw, reason=reason))
    return DecodedBatch(batch_id=batch_id, events=tuple(events), rejected=tuple(rejected))


def _decode_text(payload: str | bytes, max_events: int) -> DecodedBatch:
    """The fast way for a valid batch's JSON text, the event-by-event way for the rest.

    The fast way's events were just validated by :class:`WireBatch`, so :class:`DecodedBatch`
    takes them as they are (``model_construct``): validating them once more against its
    union of the four kinds cost about 1 us per event, a sixth of decoding a batch.
    """
    try:
        batch = WireBatch.model_validate_json(payload)
    except Exception:  # refused, or a validator's bug: decoded event by event below
        pass
    else:
        if len(batch.events) <= max_events:
            return DecodedBatch.model_construct(batch_id=batch.batch_id, events=batch.events)
    try:
        decoded = _loads_by_event(payload)
    except ValueError as exc:
        kind = type(payload).__name__
        return _reject_whole(payload, f"batch: must be a JSON object, got {kind} (not JSON: {exc})")
    if isinstance(decoded, dict):
        return decode_batch(decoded, max_events)
    return _reject_whole(decoded, f"batch: must be a JSON object, got {type(decoded).__name__}")


def _loads_by_event(payload: str | bytes) -> Any:
    """``json.loads`` of a batch's text, reading what is one event's fault so that it costs only
    that event: an integer of more than 4,300 digits (which ``json`` refuses) as an
    :class:`~sessions.deep_json.OversizedInt`, refused by its field's bound; a text nested
    deeper than ``json`` goes (about 950 levels in a pool process: ``RecursionError``) with
    every object or array below 128 levels cut (:func:`sessions.deep_json.cut_text`), so the
    event holding it is refused by the depth rule, naming its field. Raises ``ValueError``
    for a text that is not JSON."""
    try:
        return json.loads(payload, parse_int=deep_json.read_int)
    except RecursionError:
        text = payload.decode() if isinstance(payload, bytes) else payload
        return json.loads(deep_json.cut_text(text), parse_int=deep_json.read_int)


def _reject_whole(payload: Any, reason: str) -> DecodedBatch:
    return DecodedBatch(batch_id=None, rejected=(RejectedEvent(payload=payload, reason=reason),))
