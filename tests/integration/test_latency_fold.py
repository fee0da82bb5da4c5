"""SQLite's histograms folded in Python (``sessions.latency_fold``) answer exactly what the
SQL forms (``json_each``, grouping, windows) answered: the sessions by status and the
ranking of users by p95, ties, runs without requests and users without a user id included.

Each example is read twice from one SQLite store: as the store reads it, and with
``folds_in_python`` answering no, which sends every read down the SQL path (PostgreSQL's
path, and SQLite's before the fold).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert

from sessions import histogram as h
from sessions import latency_fold, queries
from sessions.dashboard.reads import StatusBreakdown, by_status
from sessions.records import STATUSES, UserAggregate
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import minute_start, sessions_table
from tests.integration.support import at, reset

USERS = ("a", "b", "c", "d", "e", "user-10", "user-9", "Z")
#: Few buckets and small counts, so that many users' p95 fall in one bucket (ties).
BUCKETS = st.sampled_from([h.UNDERFLOW, 1, 2, 40, 41, 200, h.OVERFLOW]) | st.integers(
    h.UNDERFLOW, h.OVERFLOW
)
COUNTS = st.integers(1, 4) | st.integers(1, 2**40)
#: ``None`` and ``{}`` are both a run without requests (stored as SQL NULL).
HISTOGRAMS = st.none() | st.dictionaries(BUCKETS, COUNTS, max_size=6)
RUNS = st.lists(
    st.tuples(
        st.sampled_from((None, *USERS)),
        st.sampled_from(STATUSES),
        HISTOGRAMS,
        st.integers(0, 30),  # minute of last activity
        st.integers(0, 50),  # requests (the counters are not the histograms' business)
    ),
    max_size=40,
)
FOLD_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SessionStore]:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    store = SessionStore(url, settings=Settings(database_url=url))
    store.upgrade()
    yield store
    store.dispose()


def insert_runs(store: SessionStore, runs: list[tuple[Any, ...]]) -> None:
    """One live row per run, straight into ``sessions`` (whatever an apply could produce)."""
    reset(store)
    if not runs:
        return
    rows = [
        {
            "session_id": f"s-{n}",
            "user_id": user,
            "status": status,
            "created_at": at(0),
            "last_activity": at(minute) + timedelta(seconds=n % 60),
            "last_activity_minute": minute_start(at(minute) + timedelta(seconds=n % 60)),
            "request_count": requests,
            "cost": requests / 10,
            "latency": latency,
        }
        for n, (user, status, latency, minute, requests) in enumerate(runs)
    ]
    with store.engine.begin() as connection:
        connection.execute(insert(sessions_table), rows)


def as_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, the SQL forms (no fold in Python on any connection)."""
    monkeypatch.setattr(latency_fold, "folds_in_python", lambda _connection: False)


def both_ways(monkeypatch: pytest.MonkeyPatch, read: Any) -> tuple[Any, Any]:
    """``read()`` folded in Python, then by the SQL forms."""
    folded = read()
    with monkeypatch.context() as patch:
        as_sql(patch)
        in_sql = read()
    return folded, in_sql


@FOLD_SETTINGS
@given(runs=RUNS)
def test_sessions_by_status_are_the_sql_forms(
    sqlite_store: SessionStore, monkeypatch: pytest.MonkeyPatch, runs: list[tuple[Any, ...]]
) -> None:
    insert_runs(sqlite_store, runs)
    folded, in_sql = both_ways(monkeypatch, lambda: by_status(sqlite_store))
    assert isinstance(folded, StatusBreakdown)
    assert folded == in_sql


@FOLD_SETTINGS
@given(runs=RUNS, limit=st.integers(1, 10), window=st.booleans())
def test_the_p95_ranking_is_the_sql_forms(
    sqlite_store: SessionStore,
    monkeypatch: pytest.MonkeyPatch,
    runs: list[tuple[Any, ...]],
    limit: int,
    window: bool,
) -> None:
    insert_runs(sqlite_store, runs)
    since, until = (at(5), at(20)) if window else (None, None)

    def top() -> list[UserAggregate]:
        return sqlite_store.top_users("p95", limit=limit, since=since, until=until)

    folded, in_sql = both_ways(monkeypatch, top)
    assert folded == in_sql


@FOLD_SETTINGS
@given(runs=RUNS)
def test_the_folded_histograms_are_the_grouped_pairs(
    sqlite_store: SessionStore, runs: list[tuple[Any, ...]]
) -> None:
    """Per user, :func:`latency_fold.fold` of the texts is the SQL grouping of the pairs, and
    only users with a bucket appear."""
    insert_runs(sqlite_store, runs)
    t = sessions_table.c
    with sqlite_store.engine.connect() as connection:
        texts = connection.execute(latency_fold.latency_texts(t.user_id, []))
        folded = latency_fold.fold(texts)
        grouped: dict[Any, dict[int, int]] = {}
        for user, bucket, count in connection.execute(queries.histograms([], by_user=True)):
            grouped.setdefault(user, {})[bucket] = count
    assert folded == grouped


def test_ties_users_without_requests_and_an_empty_store(
    sqlite_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal p95 buckets rank by user id; a user whose runs have no request is not ranked;
    no session at all ranks nobody."""
    assert sqlite_store.top_users("p95") == []
    insert_runs(
        sqlite_store,
        [
            ("c", "active", {7: 1}, 1, 1),
            ("a", "active", {7: 2}, 1, 2),
            ("b", "completed", {3: 1, 7: 19}, 1, 20),
            ("quiet", "active", None, 1, 0),
            (None, "active", {300: 5}, 1, 5),
            ("high", "failed", {1: 18, 300: 2}, 1, 20),
        ],
    )
    ranked = [u.user_id for u in sqlite_store.top_users("p95")]
    assert ranked == ["high", "a", "b", "c"]
    folded, in_sql = both_ways(monkeypatch, lambda: sqlite_store.top_users("p95", limit=3))
    assert [u.user_id for u in folded] == ["high", "a", "b"]
    assert folded == in_sql
