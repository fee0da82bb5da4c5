"""A batch's digest is the same in every serialisation the client makes, and only then."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from sessions.batch_digest import DIGEST_VERSION, DIGESTED_FIELDS, content_digest, same_content
from sessions.decoding import DecodedBatch, decode_batch, read_batch
from sessions.events import Batch, CreateEvent, EndEvent, MessageEvent, RecordEvent
from sessions.plain import batch_json, plain_record, record_event
from sessions.rules import check_id

MAX_EVENTS = 10_000
BATCH_ID = uuid.UUID("6f1d9a56-3c1e-4a8e-9c43-1f4f1d0e2b7a")
AT = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)


def digest(payload: Any) -> str | None:
    """The digest of ``payload`` as the store reads it: a text of plain records without
    models (``sessions.wire_records``), anything else by the models."""
    return content_digest(read_batch(payload, MAX_EVENTS))


def events() -> list[CreateEvent | RecordEvent | EndEvent]:
    return [
        CreateEvent(
            session_id="agent-1",
            user_id="user-1",
            at=AT,
            metadata={"zone": "eu", "limits": {"b": 2, "a": [1, {"y": 1, "x": 0.1}]}},
        ),
        RecordEvent(session_id="agent-1", at=AT, processing_time=0.1 + 0.2, error=True, cost=1e-7),
        RecordEvent(session_id="agent-1", at=AT, processing_time=1.0, input_tokens=12),
        EndEvent(session_id="agent-1", at=AT + timedelta(seconds=1), status="failed"),
    ]


def test_the_trackers_text_and_the_spools_message_digest_alike() -> None:
    """The tracker publishes ``batch_json``; a batch it could not publish goes to the spool as
    ``Batch.to_message()`` (every field, other time format) and is replayed from there."""
    check_id("agent-1")  # plain_record takes only ids seen valid
    fields = [
        plain_record("agent-1", 0.25 * n, n % 3 == 0, None, True, n, 2 * n, 0.5) for n in range(5)
    ]
    assert all(item is not None for item in fields)
    records = [item for item in fields if item is not None]
    text = batch_json(BATCH_ID, records)
    spooled = Batch(batch_id=BATCH_ID, events=tuple(record_event(item) for item in records))
    assert digest(text) == digest(spooled.to_message())
    assert digest(text) == digest(json.dumps(spooled.to_message(), separators=(",", ":")))
    assert digest(text) == content_digest(decode_batch(spooled, MAX_EVENTS))


def test_any_json_re_encoding_of_the_same_events_digests_alike() -> None:
    batch = Batch(batch_id=BATCH_ID, events=tuple(events()))
    message = batch.to_message()
    expected = digest(message)
    assert expected is not None and expected.startswith(f"{DIGEST_VERSION}:")

    # Same content, every object's keys in reverse order, at every level of metadata too.
    reordered = _reverse_keys(message)
    assert list(reordered) == ["events", "batch_id"]
    assert digest(reordered) == expected
    # The same instants at another UTC offset, whole seconds of processing time as integers.
    plus_one = timezone(timedelta(hours=1))
    rewritten = json.loads(json.dumps(message))
    for event in rewritten["events"]:
        at = datetime.fromisoformat(event["at"].replace("Z", "+00:00"))
        event["at"] = at.astimezone(plus_one).isoformat()
        if event.get("processing_time") == 1.0:
            event["processing_time"] = 1
    assert digest(rewritten) == expected
    assert digest(json.dumps(rewritten, indent=2)) == expected


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _reverse_keys(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(item) for item in value]
    return value


@pytest.mark.parametrize(
    "change",
    [
        "a counter",
        "an event time",
        "a metadata value",
        "one event less",
        "events in another order",
        "another session",
        "an owner",
        "an error flag",
        "a record before the create",
    ],
)
def test_other_events_digest_otherwise(change: str) -> None:
    original = events()
    changed = list(original)
    if change == "a counter":
        changed[2] = changed[2].model_copy(update={"input_tokens": 13})
    elif change == "an event time":
        changed[1] = changed[1].model_copy(update={"at": AT + timedelta(microseconds=1)})
    elif change == "a metadata value":
        changed[0] = changed[0].model_copy(update={"metadata": {"zone": "us"}})
    elif change == "one event less":
        del changed[2]
    elif change == "events in another order":
        changed[1], changed[2] = changed[2], changed[1]
    elif change == "an owner":
        changed[2] = changed[2].model_copy(update={"user_id": "user-1"})
    elif change == "an error flag":
        changed[1] = changed[1].model_copy(update={"error": False})
    elif change == "a record before the create":
        changed[0], changed[1] = changed[1], changed[0]
    else:
        changed[3] = changed[3].model_copy(update={"session_id": "agent-2"})
    first = Batch(batch_id=BATCH_ID, events=tuple(original))
    second = Batch(batch_id=BATCH_ID, events=tuple(changed))
    assert digest(first.to_message()) != digest(second.to_message())


def test_refused_events_count_in_the_digest_however_they_were_written() -> None:
    good = Batch(batch_id=BATCH_ID, events=tuple(events())).to_message()
    with_bad = json.loads(json.dumps(good))
    with_bad["events"].append({"kind": "record", "session_id": "agent-1", "error": "yes"})
    assert digest(with_bad) != digest(good)
    # The same refused event as another producer (or the spool) wrote it: keys reordered,
    # defaults spelled out, its time at another offset: one batch, one digest.
    rewritten = json.loads(json.dumps(good))
    rewritten["events"].append(
        {"error": "yes", "session_id": "agent-1", "kind": "record", "at": "2099-01-01T00:00:00Z"}
    )
    assert digest(rewritten) == digest(with_bad)
    # A refused event of another session, or one more, is other content.
    other = json.loads(json.dumps(good))
    other["events"].append({"kind": "record", "session_id": "agent-2", "error": "yes"})
    assert digest(other) != digest(with_bad)
    assert digest({**with_bad, "events": [*with_bad["events"], {"kind": "x"}]}) != digest(with_bad)


def test_a_metadata_number_written_as_an_integral_float_digests_alike() -> None:
    message = Batch(batch_id=BATCH_ID, events=tuple(events())).to_message()
    as_float = json.loads(json.dumps(message))
    as_float["events"][0]["metadata"] = {"zone": "eu", "n": 1.0}
    as_int = json.loads(json.dumps(message))
    as_int["events"][0]["metadata"] = {"zone": "eu", "n": 1}
    assert digest(as_float) == digest(as_int)
    as_int["events"][0]["metadata"] = {"zone": "eu", "n": 1.5}
    assert digest(as_float) != digest(as_int)


def test_content_the_serialiser_cannot_write_has_no_digest() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(3000):
        inner["x"] = {}
        inner = inner["x"]
    event = CreateEvent.model_construct(session_id="s", at=AT, kind="create", metadata=deep)
    assert content_digest(DecodedBatch(batch_id=BATCH_ID, events=(event,))) is None


def test_the_digested_fields_are_the_models_fields() -> None:
    """A change of the event models changes every digest: bump DIGEST_VERSION with it (and
    update DIGESTED_FIELDS), so that digests of the old models are not compared with new."""
    assert tuple(CreateEvent.model_fields) == DIGESTED_FIELDS["create"]
    assert tuple(RecordEvent.model_fields) == DIGESTED_FIELDS["record"]
    assert tuple(EndEvent.model_fields) == DIGESTED_FIELDS["end"]
    assert tuple(MessageEvent.model_fields) == DIGESTED_FIELDS["message"]


def test_only_two_digests_of_one_version_can_disagree() -> None:
    assert same_content("v2:aa", "v2:aa")
    assert not same_content("v2:aa", "v2:bb")
    assert same_content(None, "v2:bb")  # claimed before digests: taken for a redelivery
    assert same_content("v2:aa", None)  # this content could not be digested
    assert same_content("v1:aa", "v2:bb")  # another version: not comparable
