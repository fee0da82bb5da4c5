"""The wire contract (sessions/wire.py, ``sessions schema``) against the models it comes from.

The shipped schema must be the one generated from sessions/events.py and decoding.py, and the
two must agree: whatever the worker applies is valid under the schema, and whatever the schema
accepts the worker applies, but for the rules the schema can only describe ("checked by the
worker only"), each of which is named in the description of its field. Hypothesis draws valid
events of each kind and mutates them (a field dropped, added or given a wild value) to find a
disagreement.
"""

from __future__ import annotations

import json
import math
import re
import typing
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from sessions import events, wire
from sessions.decoding import decode_batch, parse_event
from sessions.events import Batch, SessionEvent
from sessions.plain import batch_json, plain_record
from sessions.settings import Settings
from tests.unit.test_event_bounds import nested

SCHEMA = wire.shipped_schema()
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
MAX_EVENTS = Settings().store_max_batch_events
#: The event models of the union the worker decodes, by their ``kind``.
MODELS = {
    model.model_fields["kind"].default: model
    for model in typing.get_args(typing.get_args(SessionEvent)[0])
}


def worker_refusals(batch: Any) -> list[str]:
    """Why the worker refuses parts of ``batch``, sent as the JSON text the contract asks for
    (an empty list: it applies all of it)."""
    decoded = decode_batch(json.dumps(batch), MAX_EVENTS)
    return [rejected.reason for rejected in decoded.rejected]


def schema_errors(batch: Any) -> list[str]:
    return [
        f"{list(error.absolute_path)}: {error.message}" for error in VALIDATOR.iter_errors(batch)
    ]


def in_a_batch(*items: Any) -> dict[str, Any]:
    return {"batch_id": str(uuid.uuid4()), "events": list(items)}


def minimal(kind: str) -> dict[str, Any]:
    """A valid event of ``kind`` with only the fields it needs."""
    needed = {
        "message": {"message_id": str(uuid.uuid4()), "seq": 1, "role": "user", "content": "Hello"}
    }.get(kind, {})
    return {"kind": kind, "session_id": "s-1", "at": "2024-01-01T12:00:00Z", **needed}


# -- the shipped file, its version and its routing --------------------------------------------


def test_the_shipped_schema_is_the_one_generated_from_the_models() -> None:
    assert wire.shipped_schema_text() == wire.render(wire.generate_schema()), (
        "sessions/wire.schema.json is not what the models say: regenerate it with "
        "`python -m sessions.wire > sessions/wire.schema.json`"
    )


def test_a_change_of_the_rules_comes_with_a_new_version() -> None:
    digest = wire.rules_digest(wire.generate_schema())
    assert digest == wire.RULES_DIGEST, (
        f"the wire contract's rules changed (digest {digest}): set sessions.wire.WIRE_VERSION "
        "by the compatibility rule (a minor version only adds; anything else is a major one, "
        "marked by a 'version' field in the batch), RULES_DIGEST to the new digest, and "
        "regenerate sessions/wire.schema.json"
    )
    assert SCHEMA["$id"].endswith(f":{wire.WIRE_VERSION}")
    assert re.fullmatch(r"[1-9][0-9]*\.[0-9]+", wire.WIRE_VERSION)


def test_a_prose_change_is_no_change_of_the_rules() -> None:
    reworded = json.loads(json.dumps(SCHEMA))
    reworded["description"] = "other words"
    reworded["$defs"]["RecordEvent"]["properties"]["cost"]["description"] = "other words"
    assert wire.rules_digest(reworded) == wire.rules_digest(SCHEMA)
    reworded["$defs"]["RecordEvent"]["properties"]["cost"]["maximum"] = 1
    assert wire.rules_digest(reworded) != wire.rules_digest(SCHEMA)


def test_the_schema_is_a_valid_draft_2020_12_schema_stating_the_compatibility_rule() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert wire.COMPATIBILITY in SCHEMA["description"]


def test_every_event_kind_and_field_is_in_the_schema_and_says_what_it_means() -> None:
    definitions = SCHEMA["$defs"]
    kinds = {
        definitions[ref["$ref"].rsplit("/", 1)[1]]["properties"]["kind"]["const"]
        for ref in SCHEMA["properties"]["events"]["items"]["oneOf"]
    }
    assert kinds == set(MODELS) == set(VALID_EVENTS), "a strategy below for every kind"
    used = set()
    for kind, model in MODELS.items():
        properties = definitions[model.__name__]["properties"]
        assert set(properties) == set(model.model_fields), kind
        for name, field in properties.items():
            key = wire.meaning_key(kind, name)
            assert key is not None, (kind, name)
            assert field["description"].startswith(wire.FIELD_MEANINGS[key]), (kind, name)
            used.add(key)
    assert used == set(wire.FIELD_MEANINGS), "a meaning for every field, and no stale one"


def test_the_task_is_what_the_workers_consume() -> None:
    from sessions.worker import config
    from sessions.worker.tasks import ingest

    task = SCHEMA["$defs"]["Task"]["properties"]
    assert task["task"]["const"] == ingest.name
    (queue,) = [q for q in config.task_queues if q.name == task["queue"]["const"]]
    assert queue.exchange.name == task["exchange"]["const"]
    assert queue.routing_key == task["routing_key"]["const"]
    assert config.task_routes[ingest.name]["queue"] == queue.name
    assert "json" in config.accept_content
    assert task["content_type"]["const"] == "application/json"


def test_sessions_schema_prints_the_shipped_schema() -> None:
    from sessions.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert result.output == wire.shipped_schema_text()
    assert json.loads(result.output)["$id"] == f"urn:agent-sessions:wire:{wire.WIRE_VERSION}"


# -- events: valid ones of each kind, and mutations of them ------------------------------------

ids = st.from_regex(r"[!-~]{1,40}", fullmatch=True) | st.sampled_from(["u" * 255, "~", "a-1"])
offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def rfc3339(draw: st.DrawFn, start: datetime, end: datetime) -> str:
    """An RFC 3339 text of a moment in ``[start, end]``, in an offset and with a fraction of
    hypothesis's choosing."""
    moment = draw(st.datetimes(start.replace(tzinfo=None), end.replace(tzinfo=None)))
    local = moment.replace(tzinfo=UTC).astimezone(draw(offsets | st.just(UTC)))
    digits = draw(st.integers(0, 9))
    fraction = f".{local.microsecond:06d}000"[: digits + 1] if digits else ""
    offset = local.strftime("%z")
    zone = (
        draw(st.sampled_from(["Z", "z"]))
        if offset == "+0000" and draw(st.booleans())
        else (f"{offset[:3]}:{offset[3:]}")
    )
    separator = draw(st.sampled_from("Tt"))
    return f"{local:%Y-%m-%d}{separator}{local:%H:%M:%S}{fraction}{zone}"


#: Moments every worker accepts: after the earliest, and well before any worker's clock.
past = rfc3339(events.MIN_EVENT_TIME + timedelta(days=1), datetime(2025, 1, 1, tzinfo=UTC))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.text(st.characters(codec="utf-8", exclude_characters="\x00")), children, max_size=3
        )
    ),
    max_leaves=8,
)
metadata = st.dictionaries(
    st.text(max_size=8).filter(lambda k: "\x00" not in k), json_values, max_size=4
)
seconds = st.floats(0, events.MAX_PROCESSING_TIME) | st.integers(0, int(events.MAX_PROCESSING_TIME))
costs = st.floats(0, events.MAX_COST) | st.integers(0, int(events.MAX_COST))
tokens = st.integers(0, events.MAX_TOKENS)
roles = st.from_regex(events.ROLE_PATTERN, fullmatch=True)
contents = st.text(st.characters(codec="utf-8", exclude_characters="\x00")) | st.sampled_from(
    ["x" * events.MAX_MESSAGE_BYTES, "é" * (events.MAX_MESSAGE_BYTES // 2)]
)
seqs = st.integers(0, events.MAX_SEQ)
uuids = st.uuids().map(str) | st.uuids().map(lambda one: str(one).upper())


def event(
    kind: str,
    needed: dict[str, st.SearchStrategy[Any]] | None = None,
    **optional: st.SearchStrategy[Any],
) -> st.SearchStrategy[dict[str, Any]]:
    """Events of ``kind``: its ``needed`` fields, and maybe some of its ``optional`` ones."""
    return st.fixed_dictionaries(
        {"kind": st.just(kind), "session_id": ids, "at": past, **(needed or {})},
        optional=optional,
    )


#: A valid event of each kind, its optional fields present or not.
VALID_EVENTS = {
    "create": event("create", user_id=st.none() | ids, metadata=st.none() | metadata),
    "record": event(
        "record",
        user_id=st.none() | ids,
        processing_time=seconds,
        error=st.booleans(),
        counts_request=st.booleans(),
        input_tokens=tokens,
        output_tokens=tokens,
        cost=costs,
    ),
    "end": event("end", status=st.sampled_from(["completed", "failed", "expired"])),
    "message": event(
        "message",
        {"message_id": uuids, "seq": seqs, "role": roles, "content": contents},
        metadata=st.none() | metadata,
    ),
}
valid_events = st.one_of(*VALID_EVENTS.values())


def _edges(bound: float) -> list[float]:
    """``bound`` and the floats on either side of it."""
    return [math.nextafter(bound, -math.inf), bound, math.nextafter(bound, math.inf)]


_ID_EDGES = ["", "!", "~", "u" * 255, "u" * 256, "a b", "tab\there", "é", "\x7f", "x\x00", 7]
_TIME_EDGES = [
    "2000-01-01T00:00:00Z",
    "2000-01-01T00:00:00+00:01",
    "2000-01-01T00:59:59+01:00",
    "2024-01-01T12:00:00.123456789-23:59",
    "2024-02-29T12:00:00Z",
    "2024-01-01T12:00:00",
    "2024-01-01",
    "2024-13-01T12:00:00Z",
    "2024-01-01T12:00:60Z",
    "2024-01-01T24:00:00Z",
    (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    1704110400,
]
_FLAG_EDGES = [True, False, 0, 1, "true", None]
_UUID = "0b9e9c52-6a36-4be5-9d57-3c0f7a1c8b1e"
#: For each event field: values at, beside and beyond its bounds, and of other JSON types.
EDGES: dict[str, list[Any]] = {
    "kind": ["create", "record", "end", "message", "Record", None],
    "session_id": _ID_EDGES,
    "user_id": [*_ID_EDGES, None],
    "at": _TIME_EDGES,
    "metadata": [
        None,
        {},
        [],
        "{}",
        {"k": [1, {"n": None}]},
        nested(events.MAX_METADATA_DEPTH),
        nested(events.MAX_METADATA_DEPTH + 1),
        {"big": "x" * (events.MAX_METADATA_BYTES - 10)},
        {"big": "x" * events.MAX_METADATA_BYTES},
        {"é": "é" * 2731},
        {"k": "\x00"},
        {"\x00": 1},
        {"k": ["\udcff"]},
    ],
    "processing_time": [
        -0.5,
        -0.0,
        0,
        1,
        0.25,
        *_edges(events.MAX_PROCESSING_TIME),
        1e300,
        "1.5",
        None,
    ],
    "cost": [
        -1,
        -0.0,
        0,
        0.125,
        *_edges(events.MAX_COST),
        int(events.MAX_COST) + 1,
        2**63,
        "1",
        True,
    ],
    "input_tokens": [
        -1,
        0,
        1,
        events.MAX_TOKENS,
        events.MAX_TOKENS + 1,
        2**63,
        1.0,
        1.5,
        1e3,
        "1",
        False,
    ],
    "output_tokens": [-1, 0, events.MAX_TOKENS, events.MAX_TOKENS + 1, 10.0, "10", None],
    "error": _FLAG_EDGES,
    "counts_request": _FLAG_EDGES,
    "status": ["completed", "failed", "expired", "active", "Completed", "", None],
    "message_id": [
        _UUID,
        _UUID.upper(),
        str(uuid.UUID(int=0)),
        _UUID[:-1],
        _UUID + "0",
        _UUID.replace("-", "_"),
        "",
        7,
        None,
    ],
    "seq": [
        -1,
        0,
        1,
        events.MAX_SEQ,
        events.MAX_SEQ + 1,
        2**64,
        1.0,
        1e3,
        1.5,
        "1",
        True,
        None,
    ],
    "role": [
        "user",
        "assistant",
        "tool",
        "a",
        "a" * 32,
        "a" * 33,
        "a-b_c9",
        "",
        "User",
        "1a",
        "_a",
        "a b",
        "é",
        7,
        None,
    ],
    "content": [
        "",
        "Hello",
        "x" * events.MAX_MESSAGE_BYTES,
        "x" * (events.MAX_MESSAGE_BYTES + 1),
        "é" * (events.MAX_MESSAGE_BYTES // 2),
        "é" * (events.MAX_MESSAGE_BYTES // 2 + 1),
        "a\x00b",
        "\ud800",
        "a\udcff",
        42,
        ["Hello"],
        None,
    ],
}
#: Any value of any field's edges, or of any other JSON type.
wild_values = st.sampled_from([value for values in EDGES.values() for value in values]) | (
    json_values
)
field_names = st.sampled_from([*EDGES, "extra", "version", "Kind"])


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid event, maybe with one field dropped, set to one of its edges, or set (added)
    to a wild value."""
    raw = dict(draw(valid))
    how = draw(st.sampled_from(["none", "drop", "edge", "edge", "wild"]))
    if how == "drop":
        del raw[draw(st.sampled_from(sorted(raw)))]
    elif how == "edge":
        name = draw(st.sampled_from(sorted(MODELS[raw["kind"]].model_fields)))
        raw[name] = draw(st.sampled_from(EDGES[name]))
    elif how == "wild":
        raw[draw(field_names)] = draw(wild_values)
    return raw


def test_every_field_has_edges_to_probe() -> None:
    assert set(EDGES) == {name for model in MODELS.values() for name in model.model_fields}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_the_schema_and_the_worker_agree_on_every_edge_of_every_field(kind: str) -> None:
    base = minimal(kind)
    assert not worker_refusals(in_a_batch(base)) and not schema_errors(in_a_batch(base))
    for name in MODELS[kind].model_fields:
        for value in EDGES[name]:
            assert_agreement(in_a_batch(base | {name: value}))
    for name in sorted(EDGES.keys() - MODELS[kind].model_fields.keys()):
        assert_agreement(in_a_batch(base | {name: EDGES[name][0]}))


@dataclass(frozen=True)
class WorkerOnlyRule:
    """A rule the worker checks beyond the schema, which the field's description states."""

    field: str
    #: The reason the worker gives when it refuses an event by this rule.
    reason: str
    #: The words of the field's description that state the rule.
    words: str
    #: Changes to a valid event that are valid under the schema and break the rule.
    breaches: tuple[dict[str, Any], ...]


WORKER_ONLY_RULES = [
    WorkerOnlyRule(
        "at",
        r"\.at: must not lie before ",
        f"not before {events.MIN_EVENT_TIME:%Y-%m-%dT%H:%M:%SZ}",
        ({"at": "1999-12-31T23:00:00-00:30"}, {"at": "2000-01-01T00:30:00+01:00"}),
    ),
    WorkerOnlyRule(
        "at",
        r"\.at: must not lie more than 5 minutes in the future",
        "at most 5 minutes ahead",
        ({"at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},),
    ),
    WorkerOnlyRule(
        "input_tokens",
        r"_tokens: Input should be a valid integer",
        "not 1000.0 or 1e3",
        ({"input_tokens": 1000.0}, {"output_tokens": 1e3}),
    ),
    WorkerOnlyRule(
        "seq",
        r"\.seq: Input should be a valid integer",
        "not 1000.0 or 1e3",
        ({"seq": 1000.0}, {"seq": 1e3}),
    ),
    WorkerOnlyRule(
        "content",
        r"\.content: must be at most \d+ bytes as UTF-8",
        f"at most {events.MAX_MESSAGE_BYTES} bytes as UTF-8",
        ({"content": "é" * (events.MAX_MESSAGE_BYTES // 2 + 1)},),
    ),
    WorkerOnlyRule(
        "content",
        r"\.content: must be valid Unicode \(no lone surrogates\)",
        "no lone surrogate",
        ({"content": "\ud800"}, {"content": "a\udcff"}),
    ),
    WorkerOnlyRule(
        "metadata",
        r"\.metadata: must be at most \d+ bytes",
        f"at most {events.MAX_METADATA_BYTES} bytes",
        ({"metadata": {"big": "x" * events.MAX_METADATA_BYTES}}, {"metadata": {"é": "é" * 2731}}),
    ),
    WorkerOnlyRule(
        "metadata",
        r"\.metadata: must be nested at most \d+ levels",
        f"nested at most {events.MAX_METADATA_DEPTH} levels",
        ({"metadata": nested(events.MAX_METADATA_DEPTH + 1)},),
    ),
    WorkerOnlyRule(
        "metadata",
        r"\.metadata: must not contain a NUL character",
        "no NUL character",
        ({"metadata": {"k": "\x00"}}, {"metadata": {"\x00": 1}}),
    ),
    WorkerOnlyRule(
        "metadata",
        r"\.metadata: must not contain a lone surrogate",
        "no lone surrogate",
        ({"metadata": {"k": ["\udcff"]}},),
    ),
]


def only_the_worker_checks(reason: str) -> bool:
    return any(re.search(rule.reason, reason) for rule in WORKER_ONLY_RULES)


def assert_agreement(batch: dict[str, Any]) -> None:
    refusals = worker_refusals(batch)
    errors = schema_errors(batch)
    if not refusals:
        assert not errors, f"the worker applies what the schema refuses: {errors}"
    elif not errors:
        unexplained = [reason for reason in refusals if not only_the_worker_checks(reason)]
        assert not unexplained, f"the worker refuses what the schema accepts: {unexplained}"


@settings(max_examples=300)
@given(st.lists(mutated(valid_events), min_size=1, max_size=3))
def test_the_schema_and_the_worker_agree_on_events(drawn: list[dict[str, Any]]) -> None:
    for one in drawn:
        assert_agreement(in_a_batch(one))
    assert_agreement(in_a_batch(*drawn))


@settings(max_examples=150)
@given(
    st.lists(valid_events, max_size=2),
    st.sampled_from(["batch_id", "events", "version", "extra"]),
    st.booleans(),
    wild_values,
)
def test_the_schema_and_the_worker_agree_on_the_batch(
    drawn: list[dict[str, Any]], name: str, drop: bool, value: Any
) -> None:
    batch = in_a_batch(*drawn)
    if drop:
        batch.pop(name, None)
    else:
        batch[name] = value
    if not drop and name == "batch_id" and _another_uuid_spelling(value):
        # The worker reads the other spellings of a UUID too (32 digits without hyphens,
        # braces, a urn: prefix), which the contract does not promise (events.UUID_PATTERN):
        # the schema refuses them, for the batch id alone.
        errors = schema_errors(batch)
        assert errors and all(error.startswith("['batch_id']") for error in errors), errors
        return
    assert_agreement(batch)


def _another_uuid_spelling(value: Any) -> bool:
    """Whether ``value`` is a UUID written otherwise than the contract's canonical form."""
    if not isinstance(value, str) or re.fullmatch(events.UUID_PATTERN, value):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@settings(max_examples=100)
@given(st.lists(valid_events, max_size=5))
def test_what_the_python_client_sends_is_valid(drawn: list[dict[str, Any]]) -> None:
    models = tuple(parse_event(raw) for raw in drawn)
    assert not schema_errors(Batch(events=models).to_message())
    records = [record for record in models if record.kind == "record"]
    fast = [
        plain_record(
            r.session_id,
            r.processing_time,
            r.error,
            r.user_id,
            r.counts_request,
            r.input_tokens,
            r.output_tokens,
            r.cost,
        )
        for r in records
    ]
    text = batch_json(uuid.uuid4(), [*models, *(fields for fields in fast if fields)])
    assert not schema_errors(json.loads(text))


@pytest.mark.parametrize("rule", WORKER_ONLY_RULES, ids=lambda rule: rule.reason)
def test_each_rule_only_the_worker_checks_is_described_and_enforced(rule: WorkerOnlyRule) -> None:
    kinds = sorted(kind for kind, model in MODELS.items() if rule.field in model.model_fields)
    assert kinds
    for kind in kinds:
        described = SCHEMA["$defs"][MODELS[kind].__name__]["properties"][rule.field]
        assert rule.words in described["description"], kind
        assert "(checked by the worker only" in described["description"], kind
        for breach in rule.breaches:
            batch = in_a_batch(minimal(kind) | breach)
            assert not schema_errors(batch), (kind, breach)
            (reason,) = worker_refusals(batch)
            assert re.search(rule.reason, reason), (kind, breach, reason)


def test_a_batch_without_its_id_is_refused_whole() -> None:
    """Its id made up at decoding, each delivery of it would be applied again (the one-call
    decoding of its text once filled in Batch's default)."""
    batch = in_a_batch(minimal("end"))
    del batch["batch_id"]
    assert schema_errors(batch)
    for form in (batch, json.dumps(batch), json.dumps(batch).encode()):
        decoded = decode_batch(form, MAX_EVENTS)
        assert decoded.batch_id is None and not decoded.events, form
        assert [rejected.reason for rejected in decoded.rejected] == ["batch_id: must be a UUID"]


def test_the_worker_reads_more_than_the_contract_promises() -> None:
    """Forms the worker happens to read, which the schema refuses: producers must not use
    them (a later worker may not read them)."""
    one = uuid.uuid4()
    for batch_id in (one.hex, f"{{{one}}}", f"urn:uuid:{one}"):
        batch = {"batch_id": batch_id, "events": []}
        assert not worker_refusals(batch) and schema_errors(batch), batch_id
    for at in ("2024-01-01 12:00:00Z", "2024-01-01T12:00Z", "2024-01-01T12:00:00+0100"):
        batch = in_a_batch({"kind": "end", "session_id": "s-1", "at": at})
        assert not worker_refusals(batch) and schema_errors(batch), at
    for message_id in (one.hex, f"{{{one}}}", f"urn:uuid:{one}"):
        batch = in_a_batch(minimal("message") | {"message_id": message_id})
        assert not worker_refusals(batch) and schema_errors(batch), message_id


def test_a_batch_of_more_events_than_a_worker_takes_is_refused_by_both() -> None:
    one = {"kind": "end", "session_id": "s-1", "at": "2024-01-01T12:00:00Z"}
    assert SCHEMA["properties"]["events"]["maxItems"] == MAX_EVENTS
    full = in_a_batch(*[one] * MAX_EVENTS)
    assert not worker_refusals(full) and VALIDATOR.is_valid(full)
    over = in_a_batch(*[one] * (MAX_EVENTS + 1))
    assert worker_refusals(over) == [
        f"events: at most {MAX_EVENTS} events per batch (got {MAX_EVENTS + 1})"
    ]
    assert not VALIDATOR.is_valid(over)
