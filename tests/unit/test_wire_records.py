"""A batch of plain records read without models holds what the models would, or is left to them.

``read_records`` may decline any batch (the models then decode it); what it must never do is
accept an event the models refuse, or hold other values than theirs. Every test compares it
with ``decode_batch`` on the same text, and the digest of both readings.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.batch_digest import content_digest
from sessions.decoding import DecodedBatch, decode_batch, read_batch
from sessions.events import Batch, CreateEvent, RecordEvent, encode_message
from sessions.plain import batch_json, plain_record, record_event
from sessions.wire_records import WireRecord, read_records

MAX_EVENTS = 10_000
BATCH_ID = uuid.UUID("0b8a4f4e-7a1c-4c55-9d52-3c1a1f0e9b21")
FIELDS = WireRecord._fields


def the_models(text: str) -> DecodedBatch:
    return decode_batch(text, MAX_EVENTS)


def values(event: Any) -> tuple[Any, ...]:
    return tuple(getattr(event, name) for name in FIELDS)


def assert_read_as_the_models_read(text: str) -> None:
    """If ``read_records`` reads ``text``, the models accept every event, with its values."""
    read = read_records(text, MAX_EVENTS)
    if read is None:
        return
    batch_id, records = read
    decoded = the_models(text)
    assert decoded.rejected == ()
    assert decoded.batch_id == batch_id
    assert [values(event) for event in decoded.events] == [tuple(r) for r in records]
    for record, event in zip(records, decoded.events, strict=True):
        assert record.at.tzinfo is event.at.tzinfo is UTC
        assert [type(v) for v in record] == [type(v) for v in values(event)]
        assert math.copysign(1, record.cost) == math.copysign(1, event.cost)
        assert record.to_payload() == event.model_dump(mode="json")
    assert content_digest(read_batch(text, MAX_EVENTS)) == content_digest(decoded)


def tracker_text(*fields: Any) -> str:
    """A batch as a tracker writes it, of ``plain_record`` events with these arguments."""
    items = [plain_record(*arguments) for arguments in fields]
    assert all(item is not None for item in items)
    return batch_json(BATCH_ID, items)  # type: ignore[arg-type]


def test_a_trackers_batch_is_read_without_models_as_the_models_read_it() -> None:
    text = tracker_text(
        ("agent-1", 0.25, False, "user-1", True, 0, 0, 0.0),
        ("agent-2", 1, True, None, False, 12, 34, 0.5),
        ("agent-1", 0.0, False, None, True, 0, 0, -0.0),
    )
    read = read_records(text, MAX_EVENTS)
    assert read is not None and len(read[1]) == 3
    assert_read_as_the_models_read(text)
    assert isinstance(read_batch(text, MAX_EVENTS).events[0], WireRecord)


def test_the_spools_form_of_the_same_batch_is_read_alike_and_digests_alike() -> None:
    """``Batch.to_message`` writes every field and ``at`` with ``Z``: read without models
    too, to the same values and digest as the tracker's text of the same events."""
    fields = [
        plain_record("agent-1", 0.1 * n, n % 2 == 0, "user-1", True, n, 2 * n, 0.5)
        for n in range(4)
    ]
    assert all(item is not None for item in fields)
    tracker = batch_json(BATCH_ID, fields)  # type: ignore[arg-type]
    spooled = encode_message(
        Batch(batch_id=BATCH_ID, events=tuple(record_event(f) for f in fields)).to_message()  # type: ignore[arg-type]
    )
    assert '"at":"' in spooled and 'Z"' in spooled
    from_tracker, from_spool = read_records(tracker, MAX_EVENTS), read_records(spooled, MAX_EVENTS)
    assert from_tracker is not None and from_tracker == from_spool
    assert_read_as_the_models_read(spooled)
    digest = content_digest(read_batch(tracker, MAX_EVENTS))
    assert digest == content_digest(read_batch(spooled, MAX_EVENTS))
    assert digest == content_digest(the_models(tracker)) == content_digest(the_models(spooled))


def _batch(*events: Any, batch_id: Any = str(BATCH_ID), **envelope: Any) -> str:
    return json.dumps({"batch_id": batch_id, "events": list(events), **envelope})


def _record(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "record",
        "session_id": "agent-1",
        "at": "2026-12-01T12:00:00.123456+00:00",
        "processing_time": 0.5,
        "error": False,
        **fields,
    }


@pytest.mark.parametrize(
    "text",
    [
        # Not records only: the models decode the whole batch.
        _batch(_record(), {"kind": "create", "session_id": "agent-1", "at": "2026-12-01T12:00Z"}),
        _batch(_record(), {"kind": "end", "session_id": "agent-1", "at": "2026-12-01T12:00:00Z"}),
        # What the models read or refuse, but not plainly a record.
        _batch(_record(at="2026-12-01T13:00:00.123456+01:00")),  # another offset: the models'
        _batch(_record(at="2026-12-01 12:00:00+00:00")),
        _batch(_record(at="2026-12-01T12:00:00.123+00:00")),
        _batch(_record(at="2026-02-30T12:00:00+00:00")),
        _batch(_record(at="1999-12-31T23:59:59Z")),
        _batch(_record(at="2999-01-01T00:00:00Z")),
        _batch(_record(at=1764590400)),
        _batch(_record(processing_time="0.5")),
        _batch(_record(processing_time=True)),
        _batch(_record(processing_time=-1.0)),
        _batch(_record(processing_time=86_400.5)),
        _batch(_record(error=0)),
        _batch(_record(counts_request="yes")),
        _batch(_record(input_tokens=1.0)),
        _batch(_record(input_tokens=-1)),
        _batch(_record(output_tokens=10**9 + 1)),
        _batch(_record(cost=1e10)),
        _batch(_record(session_id="agent 1")),
        _batch(_record(session_id="")),
        _batch(_record(user_id=7)),
        _batch(_record(extra=1)),
        _batch({k: v for k, v in _record().items() if k != "kind"}),
        _batch({k: v for k, v in _record().items() if k != "at"}),
        _batch(_record(), batch_id=BATCH_ID.hex),  # a UUID the models read, not in its form
        _batch(_record(), batch_id=f"{BATCH_ID}\n"),
        _batch(_record(), extra=1),
        '{"batch_id": "' + str(BATCH_ID) + '", "events": [' + '{"kind": "record"' + "]}",
        "[" * 5000 + "]" * 5000,
        '{"batch_id": "' + str(BATCH_ID) + '", "events": [], "n": ' + "9" * 5000 + "}",
        _batch(_record(processing_time=float("nan"))),
        _batch(*[_record()] * 3),  # three events, at most two below
    ],
)
def test_what_is_not_plainly_a_batch_of_valid_records_is_left_to_the_models(text: str) -> None:
    assert read_records(text, 2) is None
    decoded = read_batch(text, 2)
    assert not any(isinstance(event, WireRecord) for event in decoded.events)
    assert decoded == decode_batch(text, 2)


def test_every_field_given_at_its_default_or_left_out_reads_alike() -> None:
    at = "2026-12-01T12:00:00Z"
    bare = {"kind": "record", "session_id": "agent-1", "at": at}
    spelled = {
        **bare,
        "user_id": None,
        "processing_time": 0.0,
        "error": False,
        "counts_request": True,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost": 0.0,
    }
    first, second = read_records(_batch(bare), 9), read_records(_batch(spelled), 9)
    assert first is not None and first == second
    assert_read_as_the_models_read(_batch(bare))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


def _times() -> st.SearchStrategy[Any]:
    instants = st.datetimes(
        min_value=datetime(1999, 12, 31), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
    )
    return st.one_of(
        instants.map(datetime.isoformat),
        instants.map(lambda t: t.isoformat().replace("+00:00", "Z")),
        instants.map(lambda t: t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")),
        instants.map(lambda t: t.isoformat(timespec="milliseconds")),
        st.text(alphabet="0123456789-:TZ+. ", max_size=32),
        JSON_VALUES,
    )


def _numbers(maximum: float) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(min_value=0, max_value=maximum),
        st.integers(min_value=-2, max_value=int(maximum) + 2),
        st.floats(allow_nan=True, allow_infinity=True),
        st.just(-0.0),
        st.booleans(),
        JSON_VALUES,
    )


IDS = st.one_of(
    st.sampled_from(["agent-1", "user-2", "x" * 255, "x" * 256, "", "a b", "é", "a\x00"]),
    st.text(max_size=6),
    JSON_VALUES,
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.sampled_from(["record", "record", "create", "Record"]) | JSON_VALUES,
    "session_id": IDS,
    "at": _times(),
    "user_id": st.none() | IDS,
    "processing_time": _numbers(86_400),
    "error": st.booleans() | JSON_VALUES,
    "counts_request": st.booleans() | JSON_VALUES,
    "input_tokens": _numbers(10**9),
    "output_tokens": _numbers(10**9),
    "cost": _numbers(1e9),
    "surplus": JSON_VALUES,
}


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A record that is often valid, each field now and then left out or of any JSON value."""
    event = _record(at=draw(st.sampled_from(["2026-12-01T12:00:00Z", "2026-12-01T12:00:00+00:00"])))
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True)):
        if draw(st.booleans()) and name in event:
            del event[name]
        else:
            event[name] = draw(FIELD_VALUES[name])
    return event


@settings(max_examples=400, deadline=None)
@given(batch=st.lists(events(), min_size=1, max_size=4))
def test_any_batch_it_reads_the_models_read_to_the_same_values(batch: list[dict[str, Any]]) -> None:
    text = json.dumps({"batch_id": str(BATCH_ID), "events": batch})
    assert_read_as_the_models_read(text)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.lists(
        st.tuples(
            st.sampled_from(["agent-1", "agent-2", "a" * 255]),
            st.floats(min_value=0, max_value=86_400) | st.integers(0, 86_400),
            st.booleans(),
            st.none() | st.just("user-1"),
            st.booleans(),
            st.integers(0, 10**9),
            st.integers(0, 10**9),
            st.floats(min_value=0, max_value=1e9) | st.just(-0.0),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_every_trackers_batch_is_read_without_models(fields: list[tuple[Any, ...]]) -> None:
    text = tracker_text(*fields)
    assert read_records(text, MAX_EVENTS) is not None
    assert_read_as_the_models_read(text)


def test_a_batch_with_a_create_still_digests_its_records_as_a_plain_batch_does() -> None:
    """A record digests alike as a model and as a :class:`WireRecord`: a batch's digest does
    not depend on which reader took it (the model path after a create, say)."""
    at = datetime(2026, 12, 1, 12, tzinfo=UTC)
    record = RecordEvent(session_id="agent-1", at=at, processing_time=0.5, cost=1e-7)
    plain = read_records(encode_message(Batch(batch_id=BATCH_ID, events=(record,)).to_message()), 9)
    assert plain is not None
    as_model = DecodedBatch(batch_id=BATCH_ID, events=(record,))
    as_plain = DecodedBatch.model_construct(batch_id=BATCH_ID, events=plain[1])
    assert content_digest(as_model) == content_digest(as_plain)
    create = CreateEvent(session_id="agent-1", at=at - timedelta(seconds=1))
    with_create = DecodedBatch(batch_id=BATCH_ID, events=(create, record))
    assert content_digest(with_create) != content_digest(as_model)


@pytest.mark.parametrize(
    "change",
    [
        {"session_id": "agent-2"},
        {"at": "2026-12-01T12:00:00.123457+00:00"},
        {"user_id": "user-1"},
        {"processing_time": 0.5000000000000001},
        {"error": True},
        {"counts_request": False},
        {"input_tokens": 1},
        {"output_tokens": 1},
        {"cost": 0.25},
    ],
)
def test_a_plain_batch_with_any_value_changed_digests_otherwise(change: dict[str, Any]) -> None:
    original, changed = _batch(_record(), _record()), _batch(_record(), _record(**change))
    assert read_records(changed, 9) is not None
    first, second = read_batch(original, 9), read_batch(changed, 9)
    assert content_digest(first) != content_digest(second)
    # Two records swapped are other content too, unless they are equal.
    swapped = _batch(_record(**change), _record())
    assert content_digest(read_batch(swapped, 9)) != content_digest(second)


def test_a_zero_written_as_minus_zero_digests_as_zero() -> None:
    """``-0.0`` and ``0`` are the same amount, and some encoders write one for the other
    (JavaScript's ``JSON.stringify(-0)`` is ``0``): one content, one digest, whichever
    reader took it; the models and the reader still hold ``-0.0`` as given."""
    minus, plain_zero = _record(cost=-0.0, processing_time=-0.0), _record(cost=0, processing_time=0)
    digests = {
        content_digest(reader(_batch(event), 9))
        for event in (minus, plain_zero)
        for reader in (read_batch, decode_batch)
    }
    assert len(digests) == 1
    read = read_records(_batch(minus), 9)
    assert read is not None and math.copysign(1, read[1][0].cost) == -1
