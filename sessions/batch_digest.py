"""A digest of what a batch says, the same however it was serialised: the ledger's memory of it.

The ledger keeps each applied batch's id; it also keeps this digest, so that a batch arriving
under an id already there can be told apart: the *same* batch again (a redelivery, a retried
publish, a spool replay: a duplicate, dropped as always) or *other* events under a reused id
(a client bug, set aside: see ``SessionStore.apply``).

One batch reaches the worker in several serialisations, all of which must digest alike: the
tracker's own compact text (``batch_json``: defaults left out, ``at`` as ``+00:00``, floats
as ``repr``), the spool's and the outbox's (``Batch.to_message``: every field, ``at`` as
``Z``), and whatever JSON re-encoding a client applies (key order, ``1`` for ``1.0``, another
UTC offset for the same instant). So the digest is not of the text but of the events as
decoded, in order: which events are records; the records' values column by column (a
:class:`~sessions.wire_records.WireRecord` read without a model, or a
:class:`~sessions.events.RecordEvent`: the same values either way), times as integer
microseconds; every other event as pydantic-core serialises its model (fields in declaration
order, times in UTC, floats in shortest round-trip form), with metadata's keys sorted at every
level and its integral floats written as integers. An event the model refused has no
canonical form (it is refused because it cannot be read as an event: the tracker's text and
the spool's copy of it can differ in every field), so it is digested by its session id alone
(when it has one that is text): two copies of a batch with a refused event digest alike,
and a reused id is still told apart by its valid events, by how many were refused and for
which sessions.

The digest describes the events as the models read them: a change of the event models'
fields changes it, so such a change must bump :data:`DIGEST_VERSION` (a test pins the
fields). Digests of different versions are not compared. (``v2`` digested records as their
models' JSON too; ``v3`` hashes their columns: for a batch read without models, half of
``v2``'s time; for the models, about four fifths: README, Performance, item 10.)
"""

from __future__ import annotations

import hashlib
import json
import operator
import sys
from array import array
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic_core import to_json

from sessions.decoding import DecodedBatch
from sessions.events import CreateEvent, MessageEvent, RecordEvent
from sessions.wire_records import WireRecord

#: Part of every digest; a digest of another version is never compared with this one's.
DIGEST_VERSION = "v3"
#: The event fields version :data:`DIGEST_VERSION` digests, by kind.
DIGESTED_FIELDS = {
    "create": ("session_id", "at", "kind", "user_id", "metadata"),
    "record": (
        "session_id",
        "at",
        "kind",
        "user_id",
        "processing_time",
        "error",
        "counts_request",
        "input_tokens",
        "output_tokens",
        "cost",
    ),
    "end": ("session_id", "at", "kind", "status"),
    "message": ("session_id", "at", "kind", "message_id", "seq", "role", "content", "metadata"),
}


def content_digest(decoded: DecodedBatch) -> str | None:
    """``<version>:<sha256 hex>`` of ``decoded``'s events and refused events, in order.

    ``None`` when the content cannot be serialised (nesting too deep for the serialiser, a
    value it cannot write): such a batch is remembered by id alone, as before digests.
    """
    kinds = bytearray()
    records: list[tuple[Any, ...]] = []
    others: list[bytes] = []
    try:
        for event in decoded.events:
            if isinstance(event, WireRecord):
                kinds.append(_RECORD)
                records.append(event)
            elif isinstance(event, RecordEvent):
                kinds.append(_RECORD)
                records.append(_record_values(event))
            else:
                kinds.append(_OTHER)
                if isinstance(event, CreateEvent | MessageEvent) and event.metadata:
                    event = event.model_copy(update={"metadata": _sorted(event.metadata)})
                others.append(to_json(event))
        refused = [_refused_session(item.payload) for item in decoded.rejected]
        parts = [bytes(kinds), *_record_columns(records), *others, json.dumps(refused).encode()]
    # PydanticSerializationError is a ValueError; OverflowError: a number no column holds.
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    digest = hashlib.sha256()
    for part in parts:  # each part after its length: no two sequences of parts hash alike
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f"{DIGEST_VERSION}:{digest.hexdigest()}"


#: A record model's values in :class:`WireRecord`'s order, as a tuple.
_record_values = operator.attrgetter(*WireRecord._fields)
#: What each event is, in order, in the digest's first part.
_RECORD, _OTHER = ord("r"), ord("o")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: A user id no record can have (ids are printable ASCII), standing for none.
_NO_USER = "\x01"


def _record_columns(records: list[tuple[Any, ...]]) -> list[bytes]:
    """The records' values column by column (``WireRecord``'s order): the ids joined by NUL,
    which no id holds; times as integer microseconds since the epoch, numbers as
    little-endian int64 and IEEE 754 doubles (exact; ``-0.0`` as ``0.0``, the same amount,
    which some JSON encoders write as ``0``: JavaScript's ``JSON.stringify``), the two flags
    one byte per record. A column at a time costs a fraction of serialising each record
    (README, Performance, item 10)."""
    if not records:
        return []
    session, at, user, seconds, error, counts, tokens_in, tokens_out, cost = zip(
        *records, strict=True
    )
    return [
        "\x00".join(session).encode(),
        "\x00".join([_NO_USER if u is None else u for u in user]).encode(),
        _little_endian("q", [(t - _EPOCH) // _MICROSECOND for t in at]),
        _little_endian("d", [x + 0.0 for x in seconds]),  # -0.0 + 0.0 is 0.0
        bytes([e + 2 * c for e, c in zip(error, counts, strict=True)]),
        _little_endian("q", tokens_in),
        _little_endian("q", tokens_out),
        _little_endian("d", [x + 0.0 for x in cost]),
    ]


def _little_endian(typecode: str, values: Iterable[Any]) -> bytes:
    column = array(typecode, values)
    if sys.byteorder != "little":
        column.byteswap()
    return column.tobytes()


def same_content(stored: str | None, digest: str | None) -> bool:
    """Whether a batch digesting to ``digest`` may be the one the ledger holds as ``stored``.

    Only two digests of the same version can say no: a ledger row without a digest (claimed
    before digests, or of content that could not be digested) or of another version matches
    anything, as every batch under a known id did before digests.
    """
    if stored is None or digest is None:
        return True
    if stored.partition(":")[0] != digest.partition(":")[0]:
        return True
    return stored == digest


def _refused_session(payload: Any) -> str | None:
    """What a refused event contributes to the digest: its session id, if it has a text one."""
    session_id = payload.get("session_id") if isinstance(payload, dict) else None
    return session_id if isinstance(session_id, str) else None


def _sorted(value: Any) -> Any:
    """``value`` with the keys of every object in it in sorted order and its integral floats
    as integers (``1.0`` and ``1`` are one JSON number to most producers)."""
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_sorted(item) for item in value]
    if type(value) is float and value.is_integer():
        return int(value)
    return value
