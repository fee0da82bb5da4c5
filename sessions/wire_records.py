"""A batch of nothing but plain ``record`` events, read without the models: nearly every batch.

A tracker's batch is nearly always ``record`` events only, in the text
:func:`sessions.plain.batch_json` writes. Validated by the models, such a batch costs a
pool process memory it keeps: pydantic-core parses the whole text into a tree of its own
before it makes the models, and glibc keeps what that tree and 5000 models took, in pages the
process no longer shares with the others (a forked process keeps 11.1 MiB after 20 batches of
5000 events read by the models, 6.5 MiB read here: ``python -m bench.plain_decode``, README,
Performance, item 10). :func:`read_records` reads such a batch with ``json.loads`` and the
rules of :mod:`sessions.rules` into :class:`WireRecord` tuples, which the apply reads as it
reads a :class:`~sessions.events.RecordEvent` (the same attribute names).

It reads only what is plainly a valid record, the way :func:`sessions.plain.plain_record`
checks an agent's arguments: every field of the exact JSON type the model takes, within its
bounds; ids the id rule accepts; ``at`` in the RFC 3339 UTC form a tracker (``+00:00``) or
pydantic (``Z``) writes. Anything else (another kind of event, a time at another offset, a
string for a number, an unknown field, ...) makes it return ``None``, and the batch goes
through the models as before, which read it or refuse each bad event naming the field. So it
never accepts what the models refuse, and holds the values they would hold:
``tests/unit/test_wire_records.py`` checks both against the models (Hypothesis).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any, Literal, NamedTuple

from sessions.plain import plain_ids
from sessions.rules import MAX_COST, MAX_PROCESSING_TIME, MAX_TOKENS, UUID_PATTERN, check_at


class WireRecord(NamedTuple):
    """A ``record`` event as :func:`read_records` read it: the values a
    :class:`~sessions.events.RecordEvent` would hold, under the same names."""

    session_id: str
    #: Aware, in UTC (``datetime.UTC``), as the model's.
    at: datetime
    user_id: str | None
    processing_time: float
    error: bool
    counts_request: bool
    input_tokens: int
    output_tokens: int
    cost: float

    @property
    def kind(self) -> Literal["record"]:
        """The event's kind, as the models name it (not a field: the tuple holds values)."""
        return "record"

    def to_payload(self) -> dict[str, Any]:
        """The event's wire form, every field spelled out (as ``model_dump(mode="json")``)."""
        payload: dict[str, Any] = {
            "session_id": self.session_id,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "kind": "record",
        }
        payload.update(zip(self._fields[2:], self[2:], strict=True))
        return payload


#: The fields a ``record`` event may carry (the model forbids others).
_RECORD_KEYS = frozenset(("kind", *WireRecord._fields))
#: ``at`` as :func:`read_records` reads it: an RFC 3339 time on a real clock, in UTC, to the
#: second or the microsecond; the calendar date is ``datetime.fromisoformat``'s to check.
#: (``fromisoformat`` alone reads forms the model refuses: any separator for ``T``, say.)
_AT_FORM = re.compile(
    r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{6})?(?:\+00:00|Z)"
)
_BATCH_ID_FORM = re.compile(UUID_PATTERN)


def read_records(
    payload: str | bytes, max_events: int
) -> tuple[uuid.UUID, tuple[WireRecord, ...]] | None:
    """A batch's id and events, if its text holds at most ``max_events`` events, every one a
    plainly valid ``record``; else ``None`` (decode it with the models).

    Raises nothing: a text that is not JSON, too deep or holding an integer ``json`` refuses
    is ``None`` too, for the models' decoding to say why.
    """
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if type(document) is not dict or document.keys() != {"batch_id", "events"}:
        return None
    batch_id, events = document["batch_id"], document["events"]
    if type(batch_id) is not str or not _BATCH_ID_FORM.fullmatch(batch_id):
        return None
    if type(events) is not list or len(events) > max_events:
        return None
    records: list[WireRecord] = []
    append, parse_at, at_form, make = (
        records.append,
        datetime.fromisoformat,
        _AT_FORM.fullmatch,
        tuple.__new__,
    )
    for event in events:
        # One test of every field, in the order the tracker writes them; each ``get`` default
        # is the model's default for a field left out.
        if (
            type(event) is not dict
            or event.get("kind") != "record"
            or not event.keys() <= _RECORD_KEYS
        ):
            return None
        session_id, at, user_id = event.get("session_id"), event.get("at"), event.get("user_id")
        seconds, error = event.get("processing_time", 0.0), event.get("error", False)
        counts_request = event.get("counts_request", True)
        tokens_in, tokens_out = event.get("input_tokens", 0), event.get("output_tokens", 0)
        cost = event.get("cost", 0.0)
        if not (
            plain_ids(session_id, user_id)
            and type(at) is str
            and at_form(at)
            and type(seconds) in (float, int)  # not bool: ``type``, not ``isinstance``
            and 0 <= seconds <= MAX_PROCESSING_TIME  # NaN fails every comparison
            and type(error) is bool
            and type(counts_request) is bool
            and type(tokens_in) is int
            and 0 <= tokens_in <= MAX_TOKENS
            and type(tokens_out) is int
            and 0 <= tokens_out <= MAX_TOKENS
            and type(cost) in (float, int)
            and 0 <= cost <= MAX_COST
        ):
            return None
        try:
            when = check_at(parse_at(at))  # a real date, from 2000 to 5 minutes ahead
        except ValueError:
            return None
        fields = (session_id, when, user_id, float(seconds), error, counts_request)
        append(make(WireRecord, (*fields, tokens_in, tokens_out, float(cost))))
    return uuid.UUID(batch_id), tuple(records)
