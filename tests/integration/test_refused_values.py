"""What the event model accepts, every backend stores; what it refuses costs only its event.

Found by the fault suite (scenario 9): an integer beyond BIGINT, a NUL character or a lone
surrogate inside JSON metadata used to fail the whole batch's transaction, so the worker
dead-lettered the batch whole and its good events were never counted. Then they were
dead-lettered alone, as ``refused_by_database``, after the client had accepted them; since
issue 12 the model refuses them up front, naming the field, so the client refuses them too.
What is left for the database to refuse (a session's sum beyond BIGINT, after some 9 * 10**9
requests at the token bound) still costs only its own event.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from sessions.rules import (
    MAX_COST,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_PROCESSING_TIME,
    MAX_TOKENS,
    MIN_EVENT_TIME,
)
from sessions.store import SessionStore
from sessions.tables import sessions_table
from tests.integration.support import activity_rows, latency_rows

#: Values a database could not store (or a sum it could not hold), now refused by the model.
MODEL_REFUSES = {
    "tokens beyond bigint": (
        {"kind": "record", "input_tokens": 2**70},
        f"record.input_tokens: Input should be less than or equal to {MAX_TOKENS}",
    ),
    "tokens at bigint's maximum": (
        {"kind": "record", "output_tokens": 2**63 - 1},
        f"record.output_tokens: Input should be less than or equal to {MAX_TOKENS}",
    ),
    "NUL in metadata": (
        {"kind": "create", "metadata": {"k": "a\x00b"}},
        "create.metadata: must not contain a NUL character",
    ),
    "NUL in a metadata key": (
        {"kind": "create", "metadata": {"k\x00": 1}},
        "create.metadata: must not contain a NUL character",
    ),
    "lone surrogate in metadata": (
        {"kind": "create", "metadata": {"k": "\ud800"}},
        "create.metadata: must not contain a lone surrogate",
    ),
}


def _event(session_id: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "record", "session_id": session_id, "at": datetime.now(UTC).isoformat()} | (
        fields
    )


def _nested(levels: int) -> dict[str, Any]:
    value: Any = "deepest"
    for _ in range(levels):
        value = {"a": value}
    return dict(value)


@pytest.mark.parametrize("case", sorted(MODEL_REFUSES))
def test_a_value_no_database_could_store_is_refused_by_the_model_alone(
    store: SessionStore, case: str
) -> None:
    fields, reason = MODEL_REFUSES[case]
    batch_id = str(uuid.uuid4())
    message = {
        "batch_id": batch_id,
        "events": [_event("good-1"), _event("refused-1", **fields), _event("good-1")],
    }
    result = store.apply(message)
    assert (result.applied, result.rejected, result.claimed) == (2, 1, True)
    assert result.rejected_by_reason == {"invalid_event": 1}
    good = store.get("good-1")
    assert good is not None and good.request_count == 2
    assert store.get("refused-1") is None
    (letter,) = store.dead_letters()
    assert str(letter.batch_id) == batch_id
    assert letter.reason.startswith(f"events[1]: {reason}"), letter.reason
    assert "\x00" not in letter.reason + letter.payload
    letter.payload.encode("utf-8")  # no lone surrogate left
    # A refused event counts in no minute and no histogram either.
    assert sum(seen for seen, _, _ in activity_rows(store).values()) == 2
    assert latency_rows(store) == {("good-1", 1, 0): 2}  # the good records, under 1 ms
    assert store.apply(message).duplicate == 3


def test_whatever_the_model_accepts_at_its_bounds_is_applied(store: SessionStore) -> None:
    """Item 5 of issue 12: every field at its bound, twice over, on SQLite and PostgreSQL."""
    now = datetime.now(UTC)
    metadata = _nested(MAX_METADATA_DEPTH - 1) | {"emoji": "\U0001f600", "rtl": "a\u202eb"}
    metadata["pad"] = "x" * (MAX_METADATA_BYTES - len(str(metadata)) - 200)
    top = {
        "processing_time": MAX_PROCESSING_TIME,
        "input_tokens": MAX_TOKENS,
        "output_tokens": MAX_TOKENS,
        "cost": MAX_COST,
        "error": True,
    }
    session_id = "s" * 255
    events = [
        {"kind": "create", "session_id": session_id, "at": MIN_EVENT_TIME.isoformat()}
        | {"user_id": "u" * 255, "metadata": metadata},
        _event(session_id, at=MIN_EVENT_TIME.isoformat(), **top),
        _event(session_id, at=(now + timedelta(minutes=4)).isoformat(), **top),
        {"kind": "end", "session_id": session_id, "at": (now + timedelta(minutes=4)).isoformat()},
    ]
    result = store.apply({"batch_id": str(uuid.uuid4()), "events": events})
    assert (result.applied, result.rejected) == (4, 0), store.dead_letters()
    record = store.get(session_id)
    assert record is not None
    assert (record.request_count, record.error_count) == (2, 2)
    assert (record.input_tokens, record.output_tokens) == (2 * MAX_TOKENS, 2 * MAX_TOKENS)
    assert (record.total_processing_time, record.cost) == (
        2 * MAX_PROCESSING_TIME,
        2 * MAX_COST,
    )
    assert record.metadata == metadata
    assert record.created_at == MIN_EVENT_TIME and record.status == "completed"
    totals = store.aggregate()
    assert (totals.input_tokens, totals.cost) == (2 * MAX_TOKENS, 2 * MAX_COST)


def test_a_sum_postgresql_cannot_hold_costs_only_its_own_event(pg_store: SessionStore) -> None:
    """The one refusal left to the database: a session whose token sum would pass BIGINT
    (some 9 * 10**9 requests at the bound; made here by setting the counter near it)."""
    pg_store.apply({"batch_id": str(uuid.uuid4()), "events": [_event("full")]})
    with pg_store.engine.begin() as connection:
        connection.execute(
            update(sessions_table)
            .where(sessions_table.c.session_id == "full")
            .values(input_tokens=2**63 - 1 - MAX_TOKENS // 2)
        )
    message = {
        "batch_id": str(uuid.uuid4()),
        "events": [_event("other"), _event("full", input_tokens=MAX_TOKENS), _event("other")],
    }
    result = pg_store.apply(message)
    assert (result.applied, result.rejected) == (2, 1)
    assert result.rejected_by_reason == {"refused_by_database": 1}
    other = pg_store.get("other")
    assert other is not None and other.request_count == 2
    (letter,) = pg_store.dead_letters()
    assert "record of full: refused by the database" in letter.reason
    assert "out of range" in letter.reason


def test_dead_letter_reasons_with_nul_characters_are_stored_escaped(store: SessionStore) -> None:
    batch_id = str(uuid.uuid4())
    store.apply({"batch_id": batch_id, "events": [_event("good-2"), _event("x", **{"a\x00": 1})]})
    (letter,) = store.dead_letters()
    assert "a\\x00" in letter.reason
    good = store.get("good-2")
    assert good is not None and good.request_count == 1


def test_a_payload_too_deep_to_serialise_is_dead_lettered_cut(store: SessionStore) -> None:
    store.dead_letter({"batch_id": str(uuid.uuid4()), "events": [_nested(5_000)]}, "too deep")
    (letter,) = store.dead_letters()
    assert letter.reason == "too deep"
    assert "[cut: nested deeper than" in letter.payload and "deepest" not in letter.payload
