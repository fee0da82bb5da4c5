"""Reads (get, list, aggregate, count_active) and the direct lifecycle calls."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from sessions.errors import SessionLimitError
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.integration.support import at, batch, create, end, live_rows, record, run_rows


def test_get_returns_none_for_an_unknown_session(store: SessionStore) -> None:
    assert store.get("nobody") is None


def test_get_returns_the_live_run(store: SessionStore) -> None:
    store.apply(batch(create("s", 0, user_id="u", metadata={"device": "mobile"}), record("s", 1)))
    session = store.get("s")
    assert session is not None
    assert (session.session_id, session.user_id, session.metadata) == (
        "s",
        "u",
        {"device": "mobile"},
    )
    assert session.request_count == 1


@pytest.fixture
def populated(store: SessionStore) -> SessionStore:
    """Nine sessions: three users, mixed states, ids deliberately out of insertion order."""
    store.apply(
        batch(
            *(
                record(f"user-{n}", n, user_id=f"owner-{n % 3}", processing_time=0.5 * n)
                for n in (5, 1, 8, 3, 0, 7, 2, 6, 4)
            ),
            record("user-1", 9, error=True),
            record("user-4", 9, error=True, input_tokens=10, output_tokens=4, cost=0.75),
        )
    )
    store.apply(batch(end("user-2", 10), end("user-5", 10, "failed"), end("user-8", 10)))
    return store


def test_list_orders_by_session_id_and_pages_by_keyset(populated: SessionStore) -> None:
    everything = [s.session_id for s in populated.list_sessions()]
    assert everything == [f"user-{n}" for n in range(9)]
    pages: list[list[str]] = []
    after = None
    while True:
        page = populated.list_sessions(limit=4, after=after)
        if not page:
            break
        pages.append([s.session_id for s in page])
        after = page[-1].session_id
    assert pages == [everything[0:4], everything[4:8], everything[8:9]]


def test_keyset_pages_do_not_shift_when_sessions_are_added(populated: SessionStore) -> None:
    first = populated.list_sessions(limit=3)
    populated.apply(batch(record("user-00", 20)))  # sorts before the cursor
    second = populated.list_sessions(limit=3, after=first[-1].session_id)
    assert [s.session_id for s in second] == ["user-3", "user-4", "user-5"]


def test_list_filters_by_user_and_status(populated: SessionStore) -> None:
    def ids(**filters: str) -> list[str]:
        return [s.session_id for s in populated.list_sessions(**filters)]  # type: ignore[arg-type]

    assert ids(user_id="owner-2") == ["user-2", "user-5", "user-8"]
    assert ids(status="active") == ["user-0", "user-1", "user-3", "user-4", "user-6", "user-7"]
    assert ids(status="completed") == ["user-2", "user-8"]
    assert ids(user_id="owner-2", status="failed") == ["user-5"]
    assert ids(user_id="owner-2", status="active") == []
    page = populated.list_sessions(status="active", limit=2, after="user-3")
    assert [s.session_id for s in page] == ["user-4", "user-6"]


def test_iter_sessions_walks_every_page(populated: SessionStore) -> None:
    ids = [s.session_id for s in populated.iter_sessions(page_size=2)]
    assert ids == [f"user-{n}" for n in range(9)]


def test_aggregate_is_computed_over_the_matching_sessions(populated: SessionStore) -> None:
    total = populated.aggregate()
    assert total.sessions == 9
    assert total.request_count == 11
    assert total.error_count == 2
    assert total.total_processing_time == 0.5 * sum(range(9)) + 2 * 0.5
    assert (total.input_tokens, total.output_tokens, total.cost) == (10, 4, 0.75)
    assert total.error_rate == 2 / 11
    assert total.average_processing_time == 19.0 / 11

    owner = populated.aggregate(user_id="owner-1")  # user-1, user-4, user-7
    assert (owner.sessions, owner.request_count, owner.error_count) == (3, 5, 2)
    assert owner.total_processing_time == 0.5 * (1 + 4 + 7) + 2 * 0.5

    active = populated.aggregate(status="active")
    assert (active.sessions, active.request_count) == (6, 8)
    both = populated.aggregate(user_id="owner-2", status="completed")
    assert (both.sessions, both.request_count, both.total_processing_time) == (2, 2, 5.0)


def test_aggregate_of_nothing_is_zero(store: SessionStore) -> None:
    empty = store.aggregate(user_id="nobody")
    assert (empty.sessions, empty.request_count, empty.error_count) == (0, 0, 0)
    assert (empty.total_processing_time, empty.cost) == (0.0, 0.0)
    assert (empty.error_rate, empty.average_processing_time) == (0.0, 0.0)


def test_count_active(populated: SessionStore) -> None:
    assert populated.count_active() == 6
    populated.apply(batch(end("user-0", 30)))
    assert populated.count_active() == 5
    populated.apply(batch(create("user-0", 31)))  # a new run is active again
    assert populated.count_active() == 6


# -- create_session and get_or_create -----------------------------------------------------


def test_create_session_creates_an_active_session_now(store: SessionStore) -> None:
    before = datetime.now(UTC)
    session = store.create_session("user-123", "user-456", {"source": "web"})
    assert (session.session_id, session.user_id, session.status) == (
        "user-123",
        "user-456",
        "active",
    )
    assert session.metadata == {"source": "web"}
    assert before <= session.created_at <= datetime.now(UTC)
    assert session.request_count == 0


def test_create_session_of_an_ended_session_starts_a_new_run(store: SessionStore) -> None:
    store.apply(batch(record("s", 0), end("s", 1)))
    session = store.create_session("s", "u")
    assert (session.run, session.status, session.request_count) == (2, "active", 0)
    assert run_rows(store)[("s", 1)]["request_count"] == 1


def _idle(store: SessionStore, session_id: str, minutes: float) -> None:
    store.apply(batch(record(session_id, when=datetime.now(UTC) - timedelta(minutes=minutes))))


def test_create_session_at_the_limit_reclaims_sessions_idle_15_minutes(
    store: SessionStore,
) -> None:
    _idle(store, "stale", 16)
    _idle(store, "recent", 5)
    session = store.create_session("new", max_active=2)
    assert session.status == "active"
    stale = store.get("stale")
    assert stale is not None and (stale.status, stale.end_reason) == ("expired", "idle")
    recent = store.get("recent")
    assert recent is not None and recent.status == "active"
    assert store.count_active() == 2


def test_create_session_at_the_limit_raises_when_nothing_is_idle(store: SessionStore) -> None:
    _idle(store, "a", 14)
    _idle(store, "b", 1)
    with pytest.raises(SessionLimitError, match="maximum of 2 active sessions"):
        store.create_session("new", max_active=2)
    assert store.get("new") is None
    assert {s: r["status"] for s, r in live_rows(store).items()} == {"a": "active", "b": "active"}


def test_create_session_below_the_limit_reclaims_nothing(store: SessionStore) -> None:
    _idle(store, "stale", 60)
    store.create_session("new", max_active=2)
    stale = store.get("stale")
    assert stale is not None and stale.status == "active"


def test_create_session_for_an_active_session_at_the_limit_is_allowed(
    store: SessionStore,
) -> None:
    _idle(store, "a", 1)
    session = store.create_session("a", max_active=1)
    assert (session.status, session.run) == ("active", 1)


def test_create_session_takes_the_limit_from_settings(database_url: str) -> None:
    store = SessionStore(database_url, settings=Settings(max_active_sessions=1))
    try:
        store.create_session("first")
        with pytest.raises(SessionLimitError):
            store.create_session("second")
        assert store.create_session("third", max_active=2).status == "active"
    finally:
        store.dispose()


def test_get_or_create_creates_an_unknown_session(store: SessionStore) -> None:
    session = store.get_or_create("user-7", "7")
    assert (session.session_id, session.user_id, session.status, session.run) == (
        "user-7",
        "7",
        "active",
        1,
    )


def test_get_or_create_returns_the_active_session(store: SessionStore) -> None:
    _idle(store, "user-7", 10)
    existing = store.get("user-7")
    assert store.get_or_create("user-7") == existing
    assert run_rows(store) == {}


def test_get_or_create_replaces_an_idle_session_with_a_new_run(store: SessionStore) -> None:
    _idle(store, "user-7", 31)
    session = store.get_or_create("user-7", "7")
    assert (session.status, session.run, session.request_count) == ("active", 2, 0)
    old = run_rows(store)[("user-7", 1)]
    assert (old["status"], old["end_reason"], old["request_count"]) == ("expired", "idle", 1)


def test_get_or_create_replaces_an_ended_session(store: SessionStore) -> None:
    store.apply(batch(record("user-7", 0), end("user-7", 1)))
    session = store.get_or_create("user-7")
    assert (session.status, session.run) == ("active", 2)
    assert at(1) < session.created_at


def test_sqlite_reads_go_on_while_a_worker_holds_the_write_lock(tmp_path: Path) -> None:
    """Store reads (the CLI's, the facade's, a tracker's ledger look) begin a plain deferred
    transaction: with ``BEGIN IMMEDIATE`` they would wait out the busy timeout, then fail."""
    store = SessionStore(f"sqlite:///{tmp_path / 'locked.db'}", settings=Settings())
    store.upgrade()
    applied = batch(record("s-1", 1))
    store.apply(applied)
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        with store.engine.begin() as connection:  # BEGIN IMMEDIATE, as apply does
            connection.execute(text("UPDATE sessions SET cost = cost + 1"))
            holding.set()
            release.wait(120)  # longer than the busy timeout: a blocked read fails "locked"

    writer = threading.Thread(target=hold_the_write_lock)
    writer.start()
    try:
        assert holding.wait(30)
        assert store.count_active() == 1
        record_ = store.get("s-1")
        assert record_ is not None and record_.request_count == 1
        assert store.aggregate().request_count == 1
        assert store.applied_batch_ids([applied.batch_id]) == {applied.batch_id}
        assert store.dead_letters() == []
    finally:
        release.set()
        writer.join(30)
        store.dispose()
