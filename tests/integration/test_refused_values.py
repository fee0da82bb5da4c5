"""Values the event model accepts but the database refuses cost only their own event.

Found by the fault suite (scenario 9): an integer beyond BIGINT, a NUL character or a lone
surrogate inside JSON metadata used to fail the whole batch's transaction, so the worker
dead-lettered the batch whole and its good events were never counted.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from sessions.store import SessionStore
from tests.integration.support import activity_rows, latency_rows

REFUSED = {
    "tokens beyond bigint": {"kind": "record", "input_tokens": 2**70},
    "NUL in metadata": {"kind": "create", "metadata": {"k": "a\x00b"}},
    "lone surrogate in metadata": {"kind": "create", "metadata": {"k": "\ud800"}},
}


def _event(session_id: str, **fields: Any) -> dict[str, Any]:
    return {"kind": "record", "session_id": session_id, "at": datetime.now(UTC).isoformat()} | (
        fields
    )


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_event_the_database_refuses_is_dead_lettered_alone(
    store: SessionStore, case: str
) -> None:
    batch_id = str(uuid.uuid4())
    refused = _event("refused-1", **REFUSED[case])
    message = {
        "batch_id": batch_id,
        "events": [
            _event("good-1"),
            refused,
            _event("good-1", processing_time=-1),
            _event("good-1"),
        ],
    }
    result = store.apply(message)
    assert result.claimed
    good = store.get("good-1")
    assert good is not None and good.request_count == 2
    letters = store.dead_letters()
    reasons = sorted(letter.reason for letter in letters)
    assert {str(letter.batch_id) for letter in letters} == {batch_id}
    assert any(reason.startswith("events[2]: record.processing_time") for reason in reasons)
    if store.engine.dialect.name == "postgresql" or case == "tokens beyond bigint":
        assert (result.applied, result.rejected) == (2, 2)
        assert result.rejected_by_reason == {"invalid_event": 1, "refused_by_database": 1}
        assert result.oldest_event_at == datetime.fromisoformat(message["events"][0]["at"])
        assert any("refused by the database" in reason for reason in reasons), reasons
        assert store.get("refused-1") is None
    else:  # SQLite stores any JSON text
        assert (result.applied, result.rejected) == (3, 1)
        assert result.rejected_by_reason == {"invalid_event": 1}
        assert result.oldest_event_at == datetime.fromisoformat(refused["at"])  # made first
    # A refused event counts in no minute and no histogram either.
    assert sum(seen for seen, _, _ in activity_rows(store).values()) == result.applied
    assert latency_rows(store) == {("good-1", 1, 0): 2}  # the good records, under 1 ms
    for letter in letters:
        assert "\x00" not in letter.reason + letter.payload
        letter.payload.encode("utf-8")  # no lone surrogate left
    assert store.apply(message).duplicate == 4


def test_dead_letter_reasons_with_nul_characters_are_stored_escaped(store: SessionStore) -> None:
    batch_id = str(uuid.uuid4())
    store.apply({"batch_id": batch_id, "events": [_event("good-2"), _event("x", **{"a\x00": 1})]})
    (letter,) = store.dead_letters()
    assert "a\\x00" in letter.reason
    good = store.get("good-2")
    assert good is not None and good.request_count == 1
