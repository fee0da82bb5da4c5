"""Conversation messages in the store: applied exactly once, in their producer's order, in the
run live at their time, bounded per run, purged with the run."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from sessions.events import Batch, MessageEvent
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import messages_table
from tests.integration.support import (
    activity_rows,
    at,
    create,
    cut_into_batches,
    end,
    live_rows,
    record,
    reset,
)


def message(
    session_id: str, seq: int, minutes: float = 0, role: str = "user", content: str = ""
) -> MessageEvent:
    return MessageEvent(
        session_id=session_id,
        at=at(minutes),
        message_id=uuid.uuid4(),
        seq=seq,
        role=role,
        content=content or f"message {seq}",
    )


def stored(store: SessionStore) -> list[tuple[str, int, int, str]]:
    """Every stored message as (session id, run, seq, content), in read order."""
    m = messages_table.c
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(m.session_id, m.run, m.seq, m.content).order_by(
                m.session_id, m.run, m.seq, m.message_id
            )
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


@st.composite
def shuffled_deliveries(draw: st.DrawFn) -> tuple[list[MessageEvent], list[Batch]]:
    """One producer's conversation (ordered by seq), cut into batches, delivered in any order
    with redeliveries."""
    count = draw(st.integers(1, 12))
    produced = [
        message("user-1", seq, minutes=seq / 10, role=("user", "assistant")[seq % 2])
        for seq in range(1, count + 1)
    ]
    batches = cut_into_batches(draw, produced)
    deliveries = draw(st.permutations(batches))
    again = draw(st.lists(st.sampled_from(batches), max_size=3))
    return produced, [*deliveries, *again]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=shuffled_deliveries())
def test_the_conversation_is_in_its_producers_order_whatever_the_delivery(
    store: SessionStore, plan: tuple[list[MessageEvent], list[Batch]]
) -> None:
    reset(store)
    produced, deliveries = plan
    for delivered in deliveries:
        store.apply(delivered)
    history = store.conversation("user-1", limit=50)
    assert [(m.message_id, m.seq, m.role, m.content) for m in history] == [
        (e.message_id, e.seq, e.role, e.content) for e in produced
    ]
    assert len(stored(store)) == len(produced)  # each once, however often delivered


def test_a_redelivered_wire_text_of_messages_is_a_duplicate_and_one_without_ids_is_refused(
    store: SessionStore,
) -> None:
    """Wire input carries its messages' ids: made up at each delivery, a redelivered batch
    would be other content under its batch id (set aside as a reused id)."""
    said = {"kind": "message", "session_id": "user-7", "at": at(1).isoformat(), "role": "user"}
    sent = json.dumps(
        {
            "batch_id": str(uuid.uuid4()),
            "events": [said | {"message_id": str(uuid.uuid4()), "seq": 1, "content": "Hi"}],
        }
    )
    first, again = store.apply(sent), store.apply(sent)
    assert (first.applied, again.applied, again.duplicate, again.reused) == (1, 0, 1, False)
    without = json.dumps(
        {"batch_id": str(uuid.uuid4()), "events": [said | {"seq": 2, "content": "Hi again"}]}
    )
    first, again = store.apply(without), store.apply(without)
    assert first.rejected_by_reason == {"invalid_event": 1} and not first.applied
    assert (again.duplicate, again.reused) == (1, False)
    (letter,) = store.dead_letters()
    assert letter.reason == "events[0]: message.message_id: Field required"
    assert stored(store) == [("user-7", 1, 1, "Hi")]


def test_a_message_is_activity_of_its_session_and_no_request(store: SessionStore) -> None:
    store.apply(Batch(events=(message("user-9", 1, minutes=1), message("user-9", 2, minutes=3))))
    row = live_rows(store)["user-9"]
    assert (row["status"], row["request_count"], row["run"]) == ("active", 0, 1)
    assert (row["created_at"], row["last_activity"]) == (at(1), at(3))
    assert row["metadata"] is None  # a message's metadata is the message's, not the session's
    assert sum(events for events, _, _ in activity_rows(store).values()) == 2
    assert sum(requests for _, requests, _ in activity_rows(store).values()) == 0


def test_each_run_keeps_its_newest_messages_only(database_url: str) -> None:
    store = SessionStore(database_url, settings=Settings(conversation_max_messages=3))
    try:
        store.apply(Batch(events=tuple(message("user-1", seq) for seq in (1, 2))))
        store.apply(Batch(events=tuple(message("user-1", seq) for seq in (5, 3, 4))))
        store.apply(Batch(events=(message("user-2", 1),)))
        assert [(s, seq) for s, _, seq, _ in stored(store)] == [
            ("user-1", 3),
            ("user-1", 4),
            ("user-1", 5),
            ("user-2", 1),
        ]
    finally:
        store.dispose()


def test_a_message_goes_to_the_run_live_at_its_time(store: SessionStore) -> None:
    store.apply(Batch(events=(create("user-1", 0), message("user-1", 10, minutes=1))))
    store.apply(Batch(events=(end("user-1", 2),)))
    store.apply(Batch(events=(create("user-1", 3), message("user-1", 40, minutes=4))))
    # A late batch: said during run 1, applied after run 2 began.
    store.apply(Batch(events=(message("user-1", 15, minutes=1.5),)))
    assert [(run, seq) for _, run, seq, _ in stored(store)] == [(1, 10), (1, 15), (2, 40)]
    assert [m.seq for m in store.conversation("user-1")] == [40]  # the live run's
    assert live_rows(store)["user-1"]["last_activity"] == at(4)


def test_a_purged_run_takes_its_conversation_with_it(store: SessionStore) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    store.apply(
        Batch(
            events=(
                create("user-1", when=old),
                message("user-1", 1, content="old question").model_copy(update={"at": old}),
                end("user-1", when=old + timedelta(minutes=1)),
                record("user-2"),
                message("user-2", 1),
            )
        )
    )
    purged = store.purge()
    assert (purged.sessions, purged.messages) == (1, 1)
    assert [session_id for session_id, *_ in stored(store)] == ["user-2"]


def test_reads_take_the_newest_of_the_live_run_oldest_first(store: SessionStore) -> None:
    store.apply(Batch(events=tuple(message("user-1", seq) for seq in range(1, 8))))
    assert [m.seq for m in store.conversation("user-1", limit=3)] == [5, 6, 7]
    assert store.conversation("nobody") == []
