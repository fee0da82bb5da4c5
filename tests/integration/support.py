"""Helpers shared by the store's integration tests: events, table snapshots, resets."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st
from sqlalchemy import delete, event, select, text

from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent
from sessions.store import SessionStore
from sessions.tables import (
    Base,
    activity_table,
    ledger_table,
    runs_table,
    sessions_table,
)
from tests.support.waiting import STALL

#: A fixed past instant the tests count event times from (events may not lie in the future).
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
#: How long a test waits for a condition in another thread or process before failing.
DEADLINE = STALL


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def record(
    session_id: str,
    minutes: float = 0,
    *,
    processing_time: float = 0.5,
    error: bool = False,
    user_id: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost: float = 0.0,
    when: datetime | None = None,
) -> RecordEvent:
    return RecordEvent(
        session_id=session_id,
        at=when or at(minutes),
        processing_time=processing_time,
        error=error,
        user_id=user_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost,
    )


def create(
    session_id: str,
    minutes: float = 0,
    *,
    user_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    when: datetime | None = None,
) -> CreateEvent:
    return CreateEvent(
        session_id=session_id, at=when or at(minutes), user_id=user_id, metadata=metadata
    )


def end(
    session_id: str, minutes: float = 0, status: str = "completed", *, when: datetime | None = None
) -> EndEvent:
    return EndEvent.model_validate(
        {"session_id": session_id, "at": when or at(minutes), "status": status}
    )


def batch(*events: CreateEvent | RecordEvent | EndEvent) -> Batch:
    return Batch(events=events)


def cut_into_batches(
    draw: st.DrawFn, events: Sequence[CreateEvent | RecordEvent | EndEvent]
) -> list[Batch]:
    """``events`` cut into consecutive batches at points hypothesis chooses."""
    result: list[Batch] = []
    current: list[CreateEvent | RecordEvent | EndEvent] = []
    for one in events:
        current.append(one)
        if draw(st.booleans()):
            result.append(Batch(events=tuple(current)))
            current = []
    if current:
        result.append(Batch(events=tuple(current)))
    return result


def with_redeliveries(draw: st.DrawFn, produced: list[Batch]) -> list[Batch]:
    """Every batch in order, and after any of them redeliveries of earlier ones."""
    deliveries: list[Batch] = []
    for index, produced_batch in enumerate(produced):
        deliveries.append(produced_batch)
        again = draw(st.lists(st.integers(0, index), max_size=2))
        deliveries.extend(produced[i] for i in again)
    return deliveries


def live_rows(store: SessionStore) -> dict[str, dict[str, Any]]:
    """Every live row as a dict of its columns, by session id."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(sessions_table)).mappings().all()
    return {row["session_id"]: dict(row) for row in rows}


def run_rows(store: SessionStore) -> dict[tuple[str, int], dict[str, Any]]:
    """Every archived run as a dict of its columns, by (session id, run)."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(runs_table)).mappings().all()
    return {(row["session_id"], row["run"]): dict(row) for row in rows}


def latency_rows(store: SessionStore) -> dict[tuple[str, int, int], int]:
    """Every run's histogram (live and archived rows' ``latency``) bucket by bucket: the count
    by (session id, run, bucket). A bucket stored with no request would show up as a 0."""
    found: dict[tuple[str, int, int], int] = {}
    with store.engine.connect() as connection:
        for table in (sessions_table, runs_table):
            rows = connection.execute(select(table.c.session_id, table.c.run, table.c.latency))
            for session_id, run, histogram in rows:
                for bucket, count in (histogram or {}).items():
                    found[(session_id, run, bucket)] = count
    return found


def activity_rows(store: SessionStore) -> dict[datetime, tuple[int, int, int]]:
    """Every stored minute's (events, requests, errors), by minute."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(activity_table)).all()
    return {row.minute: (row.events, row.requests, row.errors) for row in rows}


def ledger_ids(store: SessionStore) -> set[uuid.UUID]:
    with store.engine.connect() as connection:
        return set(connection.execute(select(ledger_table.c.batch_id)).scalars())


def snapshot(store: SessionStore) -> dict[str, Any]:
    """Everything apply can change, for before/after comparisons."""
    return {
        "live": live_rows(store),
        "runs": run_rows(store),
        "latency": latency_rows(store),
        "activity": activity_rows(store),
        "ledger": ledger_ids(store),
        "dead_letters": [(d.batch_id, d.payload, d.reason) for d in store.dead_letters(1000)],
    }


def reset(store: SessionStore) -> None:
    """Empty every table (a fresh database for one hypothesis example)."""
    with store.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            names = ", ".join(table.name for table in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names}"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(delete(table))


class CommitGate:
    """Holds every transaction of ``store``'s engine just before its COMMIT until released.

    ``reached`` is set once a transaction has done its work (and still holds its locks);
    ``release()`` lets it commit. The transaction runs in another thread.
    """

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.reached = threading.Event()
        self._release = threading.Event()
        event.listen(store.engine, "commit", self._on_commit)

    def _on_commit(self, _connection: Any) -> None:
        self.reached.set()
        if not self._release.wait(DEADLINE):
            raise AssertionError("the commit gate was never released")

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        event.remove(self.store.engine, "commit", self._on_commit)


@contextmanager
def commit_gate(store: SessionStore) -> Iterator[CommitGate]:
    gate = CommitGate(store)
    try:
        yield gate
    finally:
        gate.close()


class Worker(threading.Thread):
    """A thread running ``work`` once, keeping its result or exception for the test."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> Any:
        self.join(DEADLINE)
        assert not self.is_alive(), "the worker thread did not finish in time"
        if self.error is not None:
            raise self.error
        return self.result


def blocked_on_lock(store: SessionStore, count: int = 1) -> Callable[[], bool]:
    """A condition: at least ``count`` other backends of this database wait for a lock."""

    def condition() -> bool:
        with store.engine.connect() as connection:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        return int(waiting) >= count

    return condition


def record_message(session_id: str = "s-1", events: int = 3) -> dict[str, Any]:
    """The wire form of a batch of ``events`` records for ``session_id``, stamped now."""
    now = datetime.now(UTC)
    return Batch(
        events=tuple(RecordEvent(session_id=session_id, at=now) for _ in range(events))
    ).to_message()


def nested_document(depth: int) -> str:
    """A JSON object nested ``depth`` levels deep: ``{"a": {"a": ... 1 ...}}``."""
    return '{"a": ' * depth + "1" + "}" * depth


def nesting(document: Any) -> tuple[int, Any]:
    """How deep a :func:`nested_document` (as read back) goes, and what it holds there."""
    depth = 0
    while isinstance(document, dict):
        document, depth = document["a"], depth + 1
    return depth, document


def _metadata_as(store: SessionStore) -> str:
    return "CAST(:document AS jsonb)" if store.engine.dialect.name == "postgresql" else ":document"


def store_metadata_text(store: SessionStore, session_id: str, document: str) -> None:
    """Store ``document`` as the session's metadata with plain SQL, past every check: a row as
    one written before writes were bounded may be."""
    statement = f"UPDATE sessions SET metadata = {_metadata_as(store)} WHERE session_id = :id"
    with store.engine.begin() as connection:
        changed = connection.execute(text(statement), {"document": document, "id": session_id})
        assert changed.rowcount == 1, f"no session {session_id!r}"
    assert stored_metadata_is(store, session_id, document)


def stored_metadata_is(store: SessionStore, session_id: str, document: str) -> bool:
    """Whether the session's stored metadata is ``document`` (compared by the database)."""
    statement = f"SELECT metadata = {_metadata_as(store)} FROM sessions WHERE session_id = :id"
    with store.engine.connect() as connection:
        return bool(
            connection.execute(text(statement), {"document": document, "id": session_id}).scalar()
        )
