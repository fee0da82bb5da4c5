"""A digest of what a batch says, the same however it was serialised: the ledger's memory of it.

The ledger keeps each applied batch's id; it also keeps this digest, so that a batch arriving
under an id already there can be told apart: the *same* batch again (a redelivery, a retried
publish, a spool replay: a duplicate, dropped as always) or *other* events under a reused id
(a client bug, set aside: see ``SessionStore.apply``).

One batch reaches the worker in several serialisations, all of which must digest alike: the
tracker's own compact text (``batch_json``: defaults left out, ``at`` as ``+00:00``, floats
as ``repr``), the spool's and the outbox's (``Batch.to_message``: every field, ``at`` as
``Z``), and whatever JSON re-encoding a client applies (key order, ``1`` for ``1.0``, another
UTC offset for the same instant). So the digest is not of the text but of the validated
events, in order, as pydantic-core serialises the models (their fields in declaration order,
times in UTC, floats in shortest round-trip form), with metadata's keys sorted at every level
and its integral floats written as integers. An event the model refused has no canonical form
(it is refused because it cannot be read as an event: the tracker's text and the spool's copy
of it can differ in every field), so it is digested by its session id alone (when it has one
that is text): two copies of a batch with a refused event digest alike, and a reused id is
still told apart by its valid events, by how many were refused and for which sessions.

The digest describes the events as the models read them: a change of the event models'
fields changes it, so such a change must bump :data:`DIGEST_VERSION` (a test pins the
fields). Digests of different versions are not compared.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic_core import to_json

from sessions.decoding import DecodedBatch
from sessions.events import CreateEvent, MessageEvent

#: Part of every digest; a digest of another version is never compared with this one's.
DIGEST_VERSION = "v2"
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
    try:
        events = [
            event.model_copy(update={"metadata": _sorted(event.metadata)})
            if isinstance(event, CreateEvent | MessageEvent) and event.metadata
            else event
            for event in decoded.events
        ]
        refused = [_refused_session(item.payload) for item in decoded.rejected]
        canonical = to_json([events, refused])
    except (ValueError, TypeError, RecursionError):  # PydanticSerializationError is a ValueError
        return None
    return f"{DIGEST_VERSION}:{hashlib.sha256(canonical).hexdigest()}"


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
