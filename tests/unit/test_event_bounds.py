"""Issue 12: whatever the event model accepts serialises, and the worker can store it.

Each probe of the adversarial pass that the client accepted and the pipeline then choked on
(a lone surrogate, deep nesting, an ``at`` the calendar cannot normalise, token counts whose
sum passes BIGINT, a NUL character) is refused here by the model, naming the field and the
rule; and a wire text that holds one is dead-lettered per event, never costing its batch.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sessions.decoding import decode_batch, parse_event
from sessions.events import Batch, CreateEvent, RecordEvent
from sessions.plain import batch_json, plain_record
from sessions.rules import MAX_METADATA_DEPTH, MAX_TOKENS, MIN_EVENT_TIME
from tests.unit.test_events import AT, create, record, rejection


def nested(levels: int, leaf: Any = "x") -> dict[str, Any]:
    """An object ``levels`` deep: ``{"a": {"a": ... leaf}}`` (made without recursion)."""
    value: Any = leaf
    for _ in range(levels):
        value = {"a": value}
    assert isinstance(value, dict)
    return value


def nested_text(levels: int) -> str:
    """The JSON text of :func:`nested`, made without recursion (json.dumps would overflow)."""
    return '{"a":' * levels + '"x"' + "}" * levels


def wire(*events: str) -> str:
    """A batch's wire text from event JSON texts."""
    return f'{{"batch_id":"{uuid.uuid4()}","events":[{",".join(events)}]}}'


# -- item 1 and 5: text a JSON document cannot carry, or PostgreSQL cannot store ---------------


LONE_SURROGATE = "must not contain a lone surrogate"
NUL = "must not contain a NUL character"


@pytest.mark.parametrize(
    ("metadata", "rule", "where"),
    [
        ({"note": "\ud800"}, LONE_SURROGATE, "metadata['note']"),
        ({"note": "file-\udcff.txt"}, LONE_SURROGATE, "metadata['note']"),  # surrogateescape
        ({"\ud83d": 1}, LONE_SURROGATE, "a key of metadata"),
        ({"a": [1, {"b": "x\udfff"}]}, LONE_SURROGATE, "metadata['a'][1]['b']"),
        ({"k": "a\x00b"}, NUL, "metadata['k']"),
        ({"evil\x00key": 1}, NUL, "a key of metadata"),
        ({"a": {"b": ["\x00"]}}, NUL, "metadata['a']['b'][0]"),
    ],
)
def test_metadata_text_no_json_document_or_database_takes_is_refused_naming_the_field(
    metadata: dict[str, Any], rule: str, where: str
) -> None:
    message = rejection(create(metadata=metadata))
    assert message.startswith(f"create.metadata: {rule}"), message
    assert where in message


def test_metadata_with_any_other_unicode_is_accepted() -> None:
    metadata = {"emoji": "\U0001f600", "rtl": "a\u202eb", "zh": "用户", "\u00e9": "\x01\x7f"}
    event = parse_event(create(metadata=metadata))
    assert isinstance(event, CreateEvent) and event.metadata == metadata


# -- item 3: nesting ---------------------------------------------------------------------------


def test_metadata_nested_up_to_the_bound_is_accepted_and_serialises() -> None:
    metadata = nested(MAX_METADATA_DEPTH - 1, leaf=[1])  # the list is the last level
    event = CreateEvent(session_id="s", at=datetime.now(UTC), metadata=metadata)
    decoded = decode_batch(batch_json(uuid.uuid4(), [event]), max_events=10)
    assert decoded.events == (event,) and decoded.rejected == ()


@pytest.mark.parametrize("levels", [MAX_METADATA_DEPTH + 1, 256, 990, 5_000, 100_000])
def test_metadata_nested_deeper_than_the_bound_is_refused_naming_the_field(levels: int) -> None:
    with pytest.raises(ValidationError) as caught:
        CreateEvent(session_id="s", at=datetime.now(UTC), metadata=nested(levels))
    (error,) = caught.value.errors()
    assert error["loc"] == ("metadata",)
    assert f"must be nested at most {MAX_METADATA_DEPTH} levels deep" in error["msg"]


def test_nesting_counts_arrays_and_a_cycle_is_refused_not_recursed_into() -> None:
    metadata: dict[str, Any] = {"a": []}
    inner: list[Any] = metadata["a"]
    for _ in range(MAX_METADATA_DEPTH):
        inner.append([])
        inner = inner[0]
    assert "nested at most" in rejection(create(metadata=metadata))
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    assert "nested at most" in rejection(create(metadata=cyclic))


#: Text of any kind, and the kinds the model refuses (st.text makes no lone surrogates).
_TEXT = st.text(max_size=6) | st.sampled_from(["\ud800", "a\x00", "\udcff", "ok"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_TEXT, children, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300)
@given(metadata=st.dictionaries(_TEXT, _JSON, max_size=4))
def test_whatever_create_accepts_serialises_and_decodes_to_the_same_event(
    metadata: dict[str, Any],
) -> None:
    try:
        event = CreateEvent(session_id="s", at=datetime.now(UTC), metadata=metadata)
    except ValidationError as exc:
        assert [error["loc"] for error in exc.errors()] == [("metadata",)]
        return
    text = batch_json(uuid.uuid4(), [event])
    text.encode("utf-8")  # what a broker carries
    decoded = decode_batch(text, max_events=10)
    assert decoded.events == (event,) and decoded.rejected == ()
    assert decode_batch(Batch(events=(event,)).to_message(), max_events=10).events == (event,)


# -- item 4: event time --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "rule"),
    [
        ("0001-01-01T00:00:00+01:00", "must not lie before 2000-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00Z", "must not lie before 2000-01-01T00:00:00Z"),
        ("1999-12-31T23:59:59.999999Z", "must not lie before 2000-01-01T00:00:00Z"),
        ("2000-01-01T00:30:00+01:00", "must not lie before 2000-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59-01:00", "must not lie more than 5 minutes in the future"),
        ("9999-12-31T23:59:59Z", "must not lie more than 5 minutes in the future"),
    ],
)
def test_an_event_time_outside_the_bounds_is_refused_naming_the_field(at: str, rule: str) -> None:
    assert rejection(record(at=at)) == f"record.at: {rule}"


@pytest.mark.parametrize(
    "at",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1))),
    ],
)
def test_the_client_gets_a_value_error_for_such_a_time_not_an_overflow(at: datetime) -> None:
    with pytest.raises(ValueError, match=r"at\n  Value error, must not lie"):
        RecordEvent(session_id="s", at=at)


def test_an_event_time_from_the_lower_bound_on_is_accepted() -> None:
    assert parse_event(record(at="2000-01-01T00:00:00Z")).at == MIN_EVENT_TIME
    assert parse_event(record(at="2000-01-01T01:00:00+01:00")).at == MIN_EVENT_TIME


# -- item 5: numbers whose sums the database must hold ----------------------------------------


@pytest.mark.parametrize("field", ["input_tokens", "output_tokens"])
@pytest.mark.parametrize("value", [MAX_TOKENS + 1, 2**63 - 1, 2**64, 2**70])
def test_token_counts_beyond_the_bound_are_refused(field: str, value: int) -> None:
    message = rejection(record(**{field: value}))
    assert message == f"record.{field}: Input should be less than or equal to {MAX_TOKENS}"
    assert plain_record("s", 0.0, False, None, True, value, 0, 0.0) is None


def test_token_counts_at_the_bound_are_accepted_and_their_sums_fit_a_bigint() -> None:
    event = parse_event(record(input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS))
    assert isinstance(event, RecordEvent) and event.input_tokens == MAX_TOKENS
    # A session's sum passes BIGINT only after this many requests at the bound (README).
    assert (2**63 - 1) // MAX_TOKENS > 9 * 10**9


# -- the decoder: every per-event failure is a per-event dead letter -----------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (record(at="0001-01-01T00:00:00+01:00"), "events[1]: record.at: must not lie before"),
        (record(at="9999-12-31T23:59:59-01:00"), "events[1]: record.at: must not lie more than"),
        (record(input_tokens=2**64), "events[1]: record.input_tokens: Input should be less"),
        (create(metadata={"k": "\x00"}), "events[1]: create.metadata: must not contain a NUL"),
        (create(metadata={"k": "\ud800"}), "events[1]: create.metadata: must not contain a lone"),
        (create(metadata=nested(300)), "events[1]: create.metadata: must be nested at most"),
    ],
)
@pytest.mark.parametrize("form", ["message", "text"])
def test_a_bad_event_in_a_payload_is_dead_lettered_alone_naming_its_field(
    bad: dict[str, Any], reason: str, form: str
) -> None:
    batch_id = uuid.uuid4()
    message = {"batch_id": str(batch_id), "events": [record(session_id="a"), bad, record()]}
    decoded = decode_batch(json.dumps(message) if form == "text" else message, max_events=10)
    assert decoded.batch_id == batch_id
    assert [event.session_id for event in decoded.events] == ["a", "user-123"]
    assert [item.reason[: len(reason)] for item in decoded.rejected] == [reason]


@pytest.mark.parametrize("levels", [300, 700])
def test_deep_metadata_in_a_wire_text_is_dead_lettered_alone(levels: int) -> None:
    deep = f'{{"kind":"create","session_id":"deep","at":"{AT}","metadata":{nested_text(levels)}}}'
    decoded = decode_batch(wire(json.dumps(record(session_id="a")), deep), max_events=10)
    assert [event.session_id for event in decoded.events] == ["a"]
    (rejected,) = decoded.rejected
    assert rejected.reason.startswith("events[1]: create.metadata: must be nested at most 32")


@pytest.mark.parametrize("levels", [960, 5_000, 100_000])
def test_metadata_too_deep_for_json_costs_only_its_event(levels: int) -> None:
    """Review of issue 12, finding 4: 960 levels (about 6 KB, under the 16 KiB limit) set the
    whole batch aside (``batch: nested too deeply to decode as JSON``), its good events lost."""
    deep = f'{{"kind":"create","session_id":"deep","at":"{AT}","metadata":{nested_text(levels)}}}'
    text = wire(json.dumps(record(session_id="a")), deep, json.dumps(record(session_id="b")))
    decoded = decode_batch(text, max_events=10)
    assert decoded.batch_id is not None
    assert [event.session_id for event in decoded.events] == ["a", "b"]
    (rejected,) = decoded.rejected
    assert rejected.reason.startswith("events[1]: create.metadata: must be nested at most 32")


def test_a_wire_event_too_deep_for_json_costs_only_itself() -> None:
    decoded = decode_batch(wire(json.dumps(record()), "[" * 100_000 + "]" * 100_000), 10)
    assert [event.session_id for event in decoded.events] == ["user-123"]
    (rejected,) = decoded.rejected
    assert rejected.reason.startswith("events[1]: event: Input should be a valid dictionary")


HUGE = "9" * 5_000  # more digits than Python converts (int_max_str_digits, 4,300)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (f'"kind":"record","input_tokens":{HUGE}', "record.input_tokens: Input should be less"),
        (f'"kind":"record","output_tokens":-{HUGE}', "record.output_tokens: Input should be"),
        (f'"kind":"record","cost":{HUGE}', "record.cost: Input should be a valid number"),
        (f'"kind":"create","metadata":{{"a":{HUGE}}}', "create.metadata: must be a JSON object"),
    ],
)
def test_an_integer_of_too_many_digits_costs_only_its_event(event: str, reason: str) -> None:
    """Review of issue 12, finding 4: ``json`` refuses such an integer, and the whole batch was
    set aside as ``batch: must be a JSON object, got str (not JSON: Exceeds the limit ...)``."""
    bad = f'{{"session_id":"big","at":"{AT}",{event}}}'
    decoded = decode_batch(wire(json.dumps(record()), bad), max_events=10)
    assert [e.session_id for e in decoded.events] == ["user-123"]
    (rejected,) = decoded.rejected
    assert rejected.reason.startswith(f"events[1]: {reason}"), rejected.reason
    assert "digits" in repr(rejected.payload)  # its dead letter can be written (repr)


def test_an_unexpected_failure_validating_one_event_costs_only_that_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessions import decoding as decoding_module

    real = decoding_module.parse_event

    def fragile(payload: Any) -> Any:
        if payload.get("session_id") == "boom":
            raise OverflowError("date value out of range")
        return real(payload)

    monkeypatch.setattr(decoding_module, "parse_event", fragile)
    message = {"batch_id": str(uuid.uuid4()), "events": [record(), record(session_id="boom")]}
    decoded = decode_batch(message, max_events=10)
    assert [event.session_id for event in decoded.events] == ["user-123"]
    assert [item.reason for item in decoded.rejected] == [
        "events[1]: cannot be validated: OverflowError: date value out of range"
    ]


def test_accepted_metadata_is_a_copy_the_caller_cannot_change() -> None:
    """Review of issue 12, finding 5 (``_check_metadata`` returned the caller's objects)."""
    inner: dict[str, Any] = {"n": [1, 2]}
    given = {"inner": inner, "pair": (1, 2)}
    event = CreateEvent(session_id="s", at=AT, metadata=given)
    inner["n"].append("\ud800")
    given["more"] = "x" * 20_000
    assert event.metadata == {"inner": {"n": [1, 2]}, "pair": [1, 2]}
