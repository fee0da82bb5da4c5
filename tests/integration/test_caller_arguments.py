"""What a caller passes to ContextEngine and to the store's reads: an argument of the wrong
type or out of bounds is a ``TypeError`` / ``ValueError`` naming it and its rule, raised
before the database is asked (so never a driver's ``ProgrammingError`` or ``StatementError``),
and costs no data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from sessions.bounds import EARLIEST_MOMENT, LATEST_MOMENT
from sessions.context_engine import ContextEngine
from sessions.store import SessionStore
from tests.integration.support import (
    batch,
    record,
    snapshot,
)

YEAR_0 = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))  # 0000-12-31T23:00Z
YEAR_10000 = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1)))
MOMENT_RULE = "must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


async def _fleet(engine: ContextEngine, count: int = 3) -> None:
    """``count`` active sessions, every write applied when it returns.

    The fleet's last updates are fire-and-forget: waited for here, so that a test's "before"
    snapshot holds them and only the refused call could change the store after it.
    """
    for n in range(count):
        await engine.create_session(f"agent-{n}", user_id="user-1")
        await engine.update_session(f"agent-{n}", increment_requests=True)
    await asyncio.to_thread(engine.tracker.flush, wait=True)


@pytest.mark.parametrize("max_idle_seconds", [-1, 0, float("nan"), float("inf"), 1e300])
def test_cleanup_with_an_idle_threshold_out_of_bounds_expires_nothing(
    context_engine: ContextEngine, task_store: SessionStore, max_idle_seconds: float
) -> None:
    """``cleanup_inactive_sessions(-1)`` once expired every active session."""

    async def scenario() -> None:
        await _fleet(context_engine)
        before = snapshot(task_store)
        with pytest.raises(ValueError) as caught:
            await context_engine.cleanup_inactive_sessions(max_idle_seconds)
        assert str(caught.value) == (
            "max_idle_seconds: must be a finite number of seconds above 0 and at most "
            f"3155760000 (100 years) (got {max_idle_seconds!r})"
        )
        assert snapshot(task_store) == before
        assert task_store.count_active() == 3
        assert await context_engine.cleanup_inactive_sessions(1800) == 0  # in bounds: runs

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda e: e.get_session(123), TypeError, "session_id: must be a str, not int"),
        (lambda e: e.get_session(None), TypeError, "session_id: must be a str, not NoneType"),
        (
            lambda e: e.get_session("agent 0"),
            ValueError,
            "session_id: must be 1 to 255 printable ASCII characters without whitespace "
            "(got 'agent 0')",
        ),
        (lambda e: e.create_session(123), TypeError, "session_id: must be a str, not int"),
        (
            lambda e: e.list_sessions(status="bogus"),
            ValueError,
            "status: must be one of active, completed, failed, expired (got 'bogus')",
        ),
        (lambda e: e.list_sessions(user_id=7), TypeError, "user_id: must be a str, not int"),
        (lambda e: e.cleanup_inactive_sessions("60"), TypeError, "max_idle_seconds: must be a"),
    ],
)
def test_context_engine_refuses_a_bad_argument_naming_it(
    context_engine: ContextEngine,
    task_store: SessionStore,
    call: Callable[[ContextEngine], Any],
    error: type[Exception],
    message: str,
) -> None:
    async def scenario() -> None:
        await _fleet(context_engine)
        before = snapshot(task_store)
        with pytest.raises(error) as caught:
            await call(context_engine)
        assert type(caught.value).__module__ == "sessions.bounds"  # ours, not the driver's
        assert str(caught.value).startswith(message)
        assert snapshot(task_store) == before
        assert [s.session_id for s in await context_engine.list_sessions(status="active")] == [
            "agent-0",
            "agent-1",
            "agent-2",
        ]

    asyncio.run(scenario())


#: What a page size out of its bounds is told.
LIMIT_RULE = "must be an integer from 1 to 10000"


@pytest.mark.parametrize(
    ("read", "error", "message"),
    [
        (lambda s: s.get(123), TypeError, "session_id: must be a str, not int"),
        (lambda s: s.get("a\x00"), ValueError, "session_id: must be 1 to 255 printable"),
        (lambda s: s.list_sessions(status="bogus"), ValueError, "status: must be one of active,"),
        (lambda s: s.list_sessions(user_id=b"u"), TypeError, "user_id: must be a str, not bytes"),
        (lambda s: s.list_sessions(after=5), TypeError, "after: must be a str, not int"),
        (lambda s: s.list_sessions(limit=0), ValueError, f"limit: {LIMIT_RULE}"),
        (lambda s: s.list_sessions(limit=-1), ValueError, f"limit: {LIMIT_RULE}"),
        (lambda s: s.list_sessions(limit=10_001), ValueError, f"limit: {LIMIT_RULE}"),
        (lambda s: next(s.iter_sessions(page_size=0)), ValueError, "limit: must be an integer"),
        (lambda s: s.unhealthy(limit=-5), ValueError, "limit: must be an integer from 1"),
        (lambda s: s.unhealthy(warn_rate=2), ValueError, "warn_rate: must be a number from 0"),
        (lambda s: s.dead_letters(limit=-1), ValueError, "limit: must be an integer from 1"),
        (lambda s: s.aggregate(status="bogus"), ValueError, "status: must be one of active,"),
        (lambda s: s.aggregate(since=YEAR_0), ValueError, f"since: {MOMENT_RULE}"),
        (lambda s: s.aggregate(until=YEAR_10000), ValueError, f"until: {MOMENT_RULE}"),
        (
            lambda s: s.aggregate(since=datetime(2024, 1, 1)),
            ValueError,
            "since: must be timezone-aware",
        ),
        (lambda s: s.aggregate(until="2024-01-01"), TypeError, "until: must be a datetime"),
        (lambda s: s.top_users(since=YEAR_0), ValueError, f"since: {MOMENT_RULE}"),
        (lambda s: s.top_users(limit=0), ValueError, "limit: must be an integer from 1"),
        (lambda s: s.activity(YEAR_0), ValueError, f"since: {MOMENT_RULE}"),
        (lambda s: s.purge(ended_before=YEAR_0), ValueError, f"ended_before: {MOMENT_RULE}"),
        (
            lambda s: s.create_session("new", max_active=0),
            ValueError,
            "max_active: must be an integer from 1",
        ),
    ],
)
def test_a_read_refuses_a_bad_argument_naming_it_before_asking_the_database(
    store: SessionStore, read: Callable[[SessionStore], Any], error: type[Exception], message: str
) -> None:
    store.apply(batch(record("s-1", 0, user_id="u-1"), record("s-2", 1)))
    before = snapshot(store)
    with pytest.raises(error) as caught:
        read(store)
    assert type(caught.value).__module__ == "sessions.bounds"
    assert str(caught.value).startswith(message)
    assert snapshot(store) == before


def test_a_window_at_the_bounds_is_read_on_both_backends(store: SessionStore) -> None:
    store.apply(batch(record("s-1", 0), record("s-2", 1)))
    everything = store.aggregate(since=EARLIEST_MOMENT, until=LATEST_MOMENT)
    assert everything.sessions == 2 and everything == store.aggregate()
    assert [u.user_id for u in store.top_users(since=EARLIEST_MOMENT, until=LATEST_MOMENT)] == []
    assert store.aggregate(since=LATEST_MOMENT).sessions == 0
