"""``sessions.testing``: the in-memory store applies and reads as the store does, and the in-memory
publisher stands in for a broker (and a worker) under a real tracker. That the store's semantics
are the model's is ``tests/integration/test_properties.py``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sessions.errors import BrokerUnavailableError
from sessions.events import Batch
from sessions.settings import Settings
from sessions.testing import InMemoryPublisher, InMemoryStore
from sessions.tracker import SessionTracker

NEVER = 3600.0


def _message(*events: dict[str, Any], batch_id: str | None = None) -> dict[str, Any]:
    return {"batch_id": batch_id or str(uuid.uuid4()), "events": list(events)}


def _record(session_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "record",
        "session_id": session_id,
        "at": datetime.now(UTC).isoformat(),
        **fields,
    }


def test_a_batch_counts_once_however_often_it_is_applied() -> None:
    store = InMemoryStore()
    message = _message(_record("s-1", processing_time=0.5, error=True), _record("s-1"))
    first, second = store.apply(message), store.apply(message)
    assert (first.applied, first.claimed, second.duplicate, second.applied) == (2, True, 2, 0)
    record = store.get("s-1")
    assert record is not None
    assert (record.request_count, record.error_count, record.status) == (2, 1, "active")
    assert record.processing_time_p50 is not None  # from the run's histogram, as the store
    assert store.applied_batch_ids([uuid.UUID(message["batch_id"]), uuid.uuid4()]) == {
        uuid.UUID(message["batch_id"])
    }


def test_an_invalid_event_is_dead_lettered_with_its_reason_and_costs_no_other() -> None:
    store = InMemoryStore()
    result = store.apply(_message(_record("s-1", processing_time=-1), _record("s-1")))
    assert (result.applied, result.rejected, result.rejected_by_reason) == (
        1,
        1,
        {"invalid_event": 1},
    )
    (dead,) = store.dead_letters
    assert "processing_time" in dead.reason
    record = store.get("s-1")
    assert record is not None and record.request_count == 1


def test_runs_and_reads_follow_the_store() -> None:
    """An ended session is counted into but never reopened by a record; a create starts its
    next run; the reads filter and total live runs as the store's do."""
    store = InMemoryStore()
    start = datetime.now(UTC) - timedelta(minutes=10)
    events = [
        {"kind": "create", "session_id": "a", "at": start.isoformat(), "user_id": "u-1"},
        _record("a", processing_time=1.0),
        {"kind": "end", "session_id": "a", "at": (start + timedelta(minutes=1)).isoformat()},
        _record("b", user_id="u-2", input_tokens=7),
    ]
    store.apply(_message(*events))
    store.apply(_message(_record("a")))  # after the end: counted, the run stays ended
    ended = store.get("a")
    assert ended is not None and (ended.status, ended.request_count, ended.run) == (
        "completed",
        2,
        1,
    )
    store.apply(
        _message({"kind": "create", "session_id": "a", "at": datetime.now(UTC).isoformat()})
    )
    renewed = store.get("a")
    assert renewed is not None and (renewed.run, renewed.status, renewed.request_count) == (
        2,
        "active",
        0,
    )
    assert renewed.user_id == "u-1"  # the owner carries over to the new run
    assert [r.session_id for r in store.iter_sessions(status="active")] == ["a", "b"]
    totals = store.aggregate(user_id="u-2")
    assert (totals.sessions, totals.request_count, totals.input_tokens) == (1, 1, 7)
    assert store.aggregate().sessions == 2
    assert store.aggregate(since=datetime.now(UTC) + timedelta(minutes=1)).sessions == 0


def test_a_tracker_on_the_in_memory_store_reads_its_writes() -> None:
    store = InMemoryStore()
    with store.tracker(flush_interval=NEVER, max_batch_events=3) as tracker:
        for index in range(10):
            tracker.record("s-1", processing_time=0.1, error=index % 5 == 0, cost=0.5)
        tracker.flush(wait=True)
        record = store.get("s-1")
        assert record is not None
        assert (record.request_count, record.error_count, record.cost) == (10, 2, 5.0)
        assert tracker.stats.batches_sent == 4


def test_a_publisher_that_is_down_makes_the_tracker_give_batches_up() -> None:
    """As against a broker that does not answer: retried, then handed to on_unsent (and lost
    without a spool, counted), and flush(wait=True) says so."""
    store = InMemoryStore()
    publisher = InMemoryPublisher(store)
    publisher.down = True
    unsent: list[Batch] = []
    with SessionTracker(
        Settings(confirm_timeout_seconds=0),
        publisher=publisher,
        confirmer=store,
        spool=None,
        flush_interval=NEVER,
        on_unsent=lambda batch, error: unsent.append(batch),
    ) as tracker:
        tracker.record("s-1")
        with pytest.raises(BrokerUnavailableError, match="1 batches"):
            tracker.flush(wait=True, timeout=30)
        assert (tracker.stats.events_lost, len(unsent), store.get("s-1")) == (1, 1, None)
        assert publisher.messages == []


def test_without_a_store_the_publisher_keeps_the_messages_for_the_test() -> None:
    publisher = InMemoryPublisher()
    with SessionTracker(
        Settings(), publisher=publisher, spool=None, flush_interval=NEVER
    ) as tracker:
        tracker.create("s-1", metadata={"source": "test"})
        tracker.record("s-1", output_tokens=3)
    assert [event["kind"] for event in publisher.events()] == ["create", "record"]
    assert publisher.events()[1]["output_tokens"] == 3
    assert publisher.queued_messages() == 1  # nobody applies them: they all wait
