"""Event validation: every rule refused with a message naming the field and the rule."""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sessions.decoding import decode_batch, describe_error, parse_event
from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent, encode_message
from sessions.plain import (
    as_model,
    batch_json,
    event_json,
    peek_batch_id,
    plain_create,
    plain_end,
    plain_record,
    record_event,
)
from sessions.rules import MAX_METADATA_BYTES

AT = "2024-01-01T12:00:00Z"


def rejection(payload: dict[str, Any]) -> str:
    """The ``field: rule`` message for a payload that must be refused."""
    with pytest.raises(ValidationError) as caught:
        parse_event(payload)
    return describe_error(caught.value)


def record(**fields: Any) -> dict[str, Any]:
    return {"kind": "record", "session_id": "user-123", "at": AT, **fields}


@pytest.mark.parametrize(
    "session_id",
    [
        "user-123",
        "user-456-device-789",
        f"temp-{uuid.uuid4()}",
        "a",
        "x" * 255,
        "!~",
        "app:chat/v2?x=1",
    ],
)
def test_guide_and_boundary_session_ids_are_accepted(session_id: str) -> None:
    event = parse_event(record(session_id=session_id))
    assert event.session_id == session_id


@pytest.mark.parametrize(
    "session_id",
    ["", "x" * 256, "user 123", "user\t123", "user\n", "usér-1", "user\x7f", "user\x00"],
)
def test_bad_session_ids_are_refused_naming_field_and_rule(session_id: str) -> None:
    message = rejection(record(session_id=session_id))
    assert "session_id" in message
    assert "1 to 255 printable ASCII characters without whitespace" in message


def test_non_string_session_id_is_refused() -> None:
    assert "session_id" in rejection(record(session_id=123))


def test_user_id_follows_the_same_rule() -> None:
    message = rejection({"kind": "create", "session_id": "s", "at": AT, "user_id": "user 456"})
    assert "user_id" in message and "printable ASCII" in message


@pytest.mark.parametrize("value", [0, 0.0, 1.25, 86_400, 86_400.0])
def test_processing_time_within_bounds_is_accepted(value: float) -> None:
    event = parse_event(record(processing_time=value))
    assert isinstance(event, RecordEvent)
    assert event.processing_time == value


@pytest.mark.parametrize(
    "value", [-0.001, -1, 86_400.001, 10**9, float("nan"), float("inf"), float("-inf")]
)
def test_processing_time_out_of_bounds_is_refused(value: Any) -> None:
    message = rejection(record(processing_time=value))
    assert "processing_time" in message
    assert "finite number of seconds from 0 to 86400" in message


@pytest.mark.parametrize("field", ["processing_time", "cost"])
@pytest.mark.parametrize("value", ["1.5", "inf", "0", True])
def test_numbers_given_as_strings_or_bools_are_refused_not_converted(
    field: str, value: Any
) -> None:
    assert rejection(record(**{field: value})) == f"record.{field}: Input should be a valid number"


@pytest.mark.parametrize("value", [1_700_000_000, 1_700_000_000.5, 1_700_000_000_000])
def test_an_event_time_given_as_a_number_is_refused_not_guessed(value: Any) -> None:
    message = rejection(record(at=value))
    assert message.startswith("record.at: ")
    assert message == "record.at: must be an ISO 8601 date-time with a timezone, not a number"


@pytest.mark.parametrize("value", [1e9 + 1, 1e308])
def test_a_cost_beyond_the_bound_is_refused_so_sums_stay_finite(value: float) -> None:
    assert rejection(record(cost=value)) == "record.cost: must be a finite number from 0 to 1e+09"


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
def test_the_three_end_states_are_accepted(status: str) -> None:
    event = parse_event({"kind": "end", "session_id": "s", "at": AT, "status": status})
    assert isinstance(event, EndEvent)
    assert event.status == status


@pytest.mark.parametrize("status", ["active", "COMPLETED", "done", "", None])
def test_other_end_states_are_refused(status: Any) -> None:
    message = rejection({"kind": "end", "session_id": "s", "at": AT, "status": status})
    assert "status" in message
    assert "'completed', 'failed' or 'expired'" in message


def create(**fields: Any) -> dict[str, Any]:
    return {"kind": "create", "session_id": "user-123", "at": AT, **fields}


def test_metadata_object_up_to_16_kib_is_accepted() -> None:
    # {"k":"xxx..."} is 8 bytes of syntax plus the value.
    metadata = {"k": "x" * (MAX_METADATA_BYTES - 8)}
    event = parse_event(create(metadata=metadata))
    assert isinstance(event, CreateEvent)
    assert event.metadata == metadata
    assert parse_event(create(metadata={})).metadata == {}  # type: ignore[union-attr]


def test_metadata_over_16_kib_is_refused() -> None:
    message = rejection(create(metadata={"k": "x" * (MAX_METADATA_BYTES - 7)}))
    assert "metadata" in message
    assert f"at most {MAX_METADATA_BYTES} bytes as JSON (got {MAX_METADATA_BYTES + 1})" in message


@pytest.mark.parametrize("metadata", [[1, 2], "text", 3, True])
def test_metadata_that_is_not_an_object_is_refused(metadata: Any) -> None:
    message = rejection(create(metadata=metadata))
    assert "metadata" in message and "dictionary" in message


def test_metadata_that_is_not_json_is_refused() -> None:
    message = rejection(create(metadata={"x": float("nan")}))
    assert "metadata" in message and "must be a JSON object" in message


def test_at_must_be_aware() -> None:
    message = rejection(record(at="2024-01-01T12:00:00"))
    assert "at" in message and "timezone" in message


def test_at_is_normalised_to_utc() -> None:
    event = parse_event(record(at="2024-01-01T14:00:00+02:00"))
    assert event.at == datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert event.at.utcoffset() == timedelta(0)


def test_at_a_little_in_the_future_is_accepted() -> None:
    soon = datetime.now(UTC) + timedelta(minutes=4)
    assert parse_event(record(at=soon.isoformat())).at == soon


def test_at_more_than_five_minutes_in_the_future_is_refused() -> None:
    later = datetime.now(UTC) + timedelta(minutes=5, seconds=30)
    message = rejection(record(at=later.isoformat()))
    assert "at" in message and "more than 5 minutes in the future" in message


def test_extra_fields_are_forbidden() -> None:
    message = rejection(record(processing_tme=1.0))
    assert "processing_tme" in message and "Extra inputs are not permitted" in message


def test_fields_of_another_kind_are_forbidden() -> None:
    message = rejection(create(processing_time=1.0))
    assert "processing_time" in message and "Extra inputs are not permitted" in message


def test_unknown_kind_is_refused() -> None:
    message = rejection({"kind": "update", "session_id": "s", "at": AT})
    assert "'update'" in message and "'create', 'record', 'end'" in message


def test_missing_kind_is_refused() -> None:
    message = rejection({"session_id": "s", "at": AT})
    assert "discriminator 'kind'" in message


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("error", "yes", "valid boolean"),
        ("counts_request", 1, "valid boolean"),
        ("input_tokens", -1, "greater than or equal to 0"),
        ("output_tokens", 1.5, "valid integer"),
        ("cost", -0.01, "finite number from 0 to 1e+09"),
        ("cost", float("inf"), "finite number from 0 to 1e+09"),
    ],
)
def test_record_counters_are_validated(field: str, value: Any, rule: str) -> None:
    message = rejection(record(**{field: value}))
    assert field in message and rule in message


def test_record_defaults_are_zero() -> None:
    event = parse_event(record())
    assert isinstance(event, RecordEvent)
    assert (event.processing_time, event.error, event.input_tokens, event.output_tokens) == (
        0.0,
        False,
        0,
        0,
    )
    assert event.cost == 0.0


def test_events_and_batches_are_immutable() -> None:
    event = parse_event(record())
    with pytest.raises(ValidationError):
        event.session_id = "other"  # type: ignore[misc]
    batch = Batch(events=(event,))
    with pytest.raises(ValidationError):
        batch.batch_id = uuid.uuid4()  # type: ignore[misc]


def test_batch_round_trips_through_its_wire_form() -> None:
    batch = Batch(
        events=(
            parse_event(create(user_id="user-456", metadata={"source": "web"})),
            parse_event(record(processing_time=1.5, error=True, input_tokens=3, cost=0.25)),
            parse_event({"kind": "end", "session_id": "user-123", "at": AT, "status": "failed"}),
        )
    )
    decoded = decode_batch(batch.to_message(), max_events=10)
    assert decoded.batch_id == batch.batch_id
    assert decoded.events == batch.events
    assert decoded.rejected == ()


# -- decode_batch ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([], "batch: must be a JSON object, got list"),
        ("text", "batch: must be a JSON object, got str"),
        ({"events": []}, "batch_id: must be a UUID"),
        ({"batch_id": "not-a-uuid", "events": []}, "batch_id: must be a UUID"),
        ({"batch_id": str(uuid.uuid4())}, "events: must be a list"),
        ({"batch_id": str(uuid.uuid4()), "events": {"a": 1}}, "events: must be a list"),
        ({"batch_id": str(uuid.uuid4()), "events": [], "extra": 1}, "unexpected fields"),
    ],
)
def test_bad_envelope_rejects_the_whole_payload(payload: Any, reason: str) -> None:
    decoded = decode_batch(payload, max_events=10)
    assert decoded.batch_id is None
    assert decoded.events == ()
    assert len(decoded.rejected) == 1
    assert reason in decoded.rejected[0].reason
    assert decoded.rejected[0].payload == payload


def test_too_many_events_rejects_the_whole_batch() -> None:
    events = [record() for _ in range(4)]
    decoded = decode_batch({"batch_id": str(uuid.uuid4()), "events": events}, max_events=3)
    assert decoded.batch_id is None
    assert decoded.events == ()
    assert [r.reason for r in decoded.rejected] == ["events: at most 3 events per batch (got 4)"]


def test_exactly_max_events_is_accepted() -> None:
    events = [record() for _ in range(3)]
    decoded = decode_batch({"batch_id": str(uuid.uuid4()), "events": events}, max_events=3)
    assert len(decoded.events) == 3 and decoded.rejected == ()


def test_one_bad_event_among_good_ones_is_rejected_alone() -> None:
    batch_id = uuid.uuid4()
    bad = record(processing_time=-1)
    payload = {
        "batch_id": str(batch_id),
        "events": [record(session_id="a"), bad, record(session_id="c")],
    }
    decoded = decode_batch(payload, max_events=10)
    assert decoded.batch_id == batch_id
    assert [event.session_id for event in decoded.events] == ["a", "c"]
    assert len(decoded.rejected) == 1
    assert decoded.rejected[0].payload == bad
    assert decoded.rejected[0].reason.startswith("events[1]: record.processing_time: ")


def test_a_batch_object_decodes_to_itself() -> None:
    batch = Batch(events=(parse_event(record()),))
    decoded = decode_batch(batch, max_events=10)
    assert decoded.batch_id == batch.batch_id and decoded.events == batch.events


# -- the client's plain path and the wire text ----------------------------------------------

_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["user-123", "s", "1.5", "", "has space", 'quo"te', "back\\slash"]),
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values of ``valid`` three times in four, anything else otherwise."""
    return st.integers(0, 3).flatmap(lambda pick: valid if pick else _ANY_VALUE)


@settings(max_examples=300)
@given(
    session_id=_mostly(st.sampled_from(["user-123", "s"])),
    processing_time=_mostly(st.floats(0, 86_400) | st.integers(0, 86_400)),
    error=_mostly(st.booleans()),
    user_id=_mostly(st.sampled_from([None, "user-456"])),
    counts_request=_mostly(st.booleans()),
    input_tokens=_mostly(st.integers(0, 10**9)),
    output_tokens=_mostly(st.integers(0, 10**9)),
    cost=_mostly(st.floats(0, 1e9) | st.integers(0, 100)),
)
def test_the_plain_path_accepts_nothing_the_model_refuses_and_changes_no_value(
    **arguments: Any,
) -> None:
    for value in (arguments["session_id"], arguments["user_id"]):
        with contextlib.suppress(ValidationError):  # let some ids be known valid already
            parse_event(record(session_id=value))
    fields = plain_record(**arguments)
    if fields is None:
        return
    model = RecordEvent(at=fields[1], **arguments)
    assert record_event(fields) == model
    assert parse_event(json.loads(event_json(fields))) == model


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


_METADATA = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),  # lone surrogates and NUL among them: refused
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    session_id=_mostly(st.sampled_from(["user-123", "s"])),
    user_id=_mostly(st.sampled_from([None, "user-456"])),
    metadata=st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=6), _METADATA, max_size=4),
        _ANY_VALUE,
        st.tuples(st.integers()),
        st.just({1: "int key"}),
        st.just({"deep": _nested(40)}),  # beyond MAX_METADATA_DEPTH
    ),
)
def test_a_plain_create_accepts_nothing_the_model_refuses_and_changes_no_value(
    session_id: Any, user_id: Any, metadata: Any
) -> None:
    for value in (session_id, user_id):
        with contextlib.suppress(ValidationError):  # let some ids be known valid already
            parse_event(record(session_id=value))
    event = plain_create(session_id, user_id, metadata)
    if event is None:
        with contextlib.suppress(ValidationError):  # what the model refuses, or ...
            model = CreateEvent(session_id=session_id, at=AT, user_id=user_id, metadata=metadata)
            # ... what the plain path leaves to the model on purpose: metadata that is not a
            # dict itself (the model converts it or refuses it), or ids of another type.
            assert type(metadata) is not dict or not (
                type(session_id) is str and type(user_id) in (str, type(None))
            ), model
        return
    model = CreateEvent(session_id=session_id, at=event.at, user_id=user_id, metadata=metadata)
    assert as_model(event) == model
    assert parse_event(json.loads(event_json(event))) == model


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "done", "", None, 1])
def test_a_plain_end_accepts_the_three_end_states_only(status: Any) -> None:
    event = plain_end("s", status)
    if status not in ("completed", "failed", "expired"):
        assert event is None
        with pytest.raises(ValidationError, match="status"):
            EndEvent(session_id="s", at=AT, status=status)
        return
    assert event is not None
    model = EndEvent(session_id="s", at=event.at, status=status)
    assert as_model(event) == model
    assert parse_event(json.loads(event_json(event))) == model


def test_a_negative_zero_cost_travels_as_the_model_holds_it() -> None:
    fields = plain_record("s", 0.0, False, None, True, 0, 0, -0.0)
    assert fields is not None
    decoded = parse_event(json.loads(event_json(fields)))
    assert math.copysign(1.0, decoded.cost) == -1.0
    assert decoded.model_dump_json() == record_event(fields).model_dump_json()


def test_a_clock_before_the_earliest_event_time_leaves_create_and_end_to_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessions import plain

    class Before2000(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Before2000:
            return cls(1999, 12, 31, 23, 0, tzinfo=tz)

    monkeypatch.setattr(plain, "datetime", Before2000)
    assert plain_create("s", None, None) is None
    assert plain_end("s", "completed") is None
    with pytest.raises(ValidationError, match="must not lie before"):
        CreateEvent(session_id="s", at=Before2000.now(UTC))


def test_a_plain_id_the_rule_refuses_is_left_to_the_model() -> None:
    assert plain_create("has space", None, None) is None
    assert plain_create("s", "has space", None) is None
    assert plain_end("has space", "completed") is None
    assert plain_create(b"s", None, None) is None  # type: ignore[arg-type]


def test_plain_metadata_is_a_copy_of_its_own() -> None:
    given_metadata = {"tags": ["a"], "zone": "eu"}
    event = plain_create("s", None, given_metadata)
    assert event is not None
    given_metadata["tags"].append("b")
    given_metadata["zone"] = "us"
    assert event.metadata == {"tags": ["a"], "zone": "eu"}


def test_a_batch_made_from_plain_fields_and_models_decodes_to_the_same_events() -> None:
    parse_event(record(session_id='quo"te\\x'))  # known valid, with characters JSON escapes
    plain = plain_record('quo"te\\x', 0.25, True, None, False, 3, 0, 1.5)
    assert plain is not None
    created = parse_event({"kind": "create", "session_id": "s", "at": AT, "metadata": {"a": 1}})
    opened = plain_create("s", 'quo"te\\x', {"ü": ["é", 1.5, None, {"x": True}]})
    ended = plain_end('quo"te\\x', "failed")
    assert opened is not None and ended is not None
    batch_id = uuid.uuid4()
    decoded = decode_batch(batch_json(batch_id, [created, plain, opened, ended]), max_events=10)
    assert decoded.batch_id == batch_id and decoded.rejected == ()
    assert decoded.events == (created, record_event(plain), as_model(opened), as_model(ended))


def test_wire_text_with_a_bad_event_is_decoded_event_by_event() -> None:
    good = record(session_id="a")
    text = json.dumps({"batch_id": str(uuid.uuid4()), "events": [good, record(cost=-1)]})
    decoded = decode_batch(text, max_events=10)
    assert [event.session_id for event in decoded.events] == ["a"]
    assert [r.reason for r in decoded.rejected] == [
        "events[1]: record.cost: must be a finite number from 0 to 1e+09"
    ]
    assert (
        decode_batch("not json", max_events=10)
        .rejected[0]
        .reason.startswith("batch: must be a JSON object, got str")
    )


def test_peek_batch_id_reads_the_id_without_decoding() -> None:
    batch = Batch(events=(parse_event(record()),))
    assert peek_batch_id(encode_message(batch.to_message())) == str(batch.batch_id)
    assert peek_batch_id(batch.to_message()) == str(batch.batch_id)
    assert peek_batch_id("[]") is None and peek_batch_id(3) is None
