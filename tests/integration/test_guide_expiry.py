"""The guide's "Session Pooling" and "Session Timeout" patterns, their code as the guide writes
it (from examples/guide_patterns.py), against ``ContextEngine`` with the idle sweep running in
between.

The sweep is the worker's own ``sessions.expire_idle`` task (what beat sends), run in this
process on the test's store. A tracker whose publisher applies each batch to that store stands
in for the broker and the worker; tests/acceptance/test_guide_and_demo.py runs the same
patterns with a real worker and beat.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from examples.guide_patterns import session_pool_of, timeout_check
from sessions.context_engine import ContextEngine
from sessions.store import SessionStore
from tests.integration.support import run_rows
from tests.support.guide_agent import agent_went_quiet, serve


def idle_sweep(max_idle_seconds: float | None = None) -> list[str]:
    """One run of the worker's idle sweep task, as beat sends it (by default with no argument:
    the settings' threshold, the guide's 30 minutes)."""
    from sessions.worker import tasks

    kwargs = {} if max_idle_seconds is None else {"max_idle_seconds": max_idle_seconds}
    changed: list[str] = tasks.expire_idle.apply(kwargs=kwargs).get()
    return changed


@pytest.mark.parametrize("swept", [True, False], ids=["swept", "not-swept-yet"])
def test_the_pool_starts_a_new_run_of_an_idle_session_and_records_into_it(
    context_engine: ContextEngine, task_store: SessionStore, swept: bool
) -> None:
    async def scenario() -> None:
        await agent_went_quiet(context_engine, "user-7", requests=3)
        if swept:
            assert idle_sweep() == ["user-7"]
            idle = await context_engine.get_session("user-7")
            assert idle is not None and (idle.status, idle.record.end_reason) == ("expired", "idle")
            assert idle.is_expired(max_idle_seconds=1800)

        session_id = await session_pool_of(context_engine)("7")  # an agent process starts
        await serve(context_engine, session_id, requests=2)

        session = await context_engine.get_session(session_id)
        assert session is not None and session.status == "active"
        assert (session.record.run, session.request_count, session.user_id) == (2, 2, "7")
        assert session.total_processing_time == pytest.approx(0.5)
        assert not session.is_expired(max_idle_seconds=1800)
        past = run_rows(task_store)[("user-7", 1)]
        assert (past["status"], past["end_reason"]) == ("expired", "idle")
        assert (past["request_count"], past["total_processing_time"]) == (3, 3.0)

        # The new run is fresh: the next sweep leaves it, and the next pool hands it out.
        assert idle_sweep() == []
        assert await session_pool_of(context_engine)("7") == session_id
        again = await context_engine.get_session(session_id)
        assert again is not None and (again.record.run, again.status) == (2, "active")

    asyncio.run(scenario())


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_the_pool_never_hands_out_an_ended_session(
    context_engine: ContextEngine, task_store: SessionStore, status: str
) -> None:
    async def scenario() -> None:
        get_or_create_session = session_pool_of(context_engine)
        session_id = await get_or_create_session("8")
        await serve(context_engine, session_id, requests=4)
        await context_engine.end_session(session_id, status=status)
        assert idle_sweep() == []  # ended minutes, not 30 minutes, ago: nothing to sweep

        session_id = await session_pool_of(context_engine)("8")  # the next agent process
        await serve(context_engine, session_id, requests=1)

        session = await context_engine.get_session(session_id)
        assert session is not None and session.status == "active"
        assert (session.record.run, session.request_count) == (2, 1)
        past = run_rows(task_store)[("user-8", 1)]
        assert (past["status"], past["end_reason"], past["request_count"]) == (
            status,
            "explicit",
            4,
        )

    asyncio.run(scenario())


def test_the_timeout_pattern_replaces_a_session_the_idle_sweep_expired(
    context_engine: ContextEngine, task_store: SessionStore
) -> None:
    async def scenario() -> None:
        await agent_went_quiet(context_engine, "user-123", requests=2)
        assert idle_sweep() == ["user-123"]

        session = await timeout_check(context_engine, "user-123", "456")
        assert session is not None and session.session_id == "user-123-new"
        assert session.status == "active" and session.user_id == "456"
        await serve(context_engine, session.session_id, requests=3)

        new = await context_engine.get_session("user-123-new")
        assert new is not None and (new.status, new.request_count) == ("active", 3)
        # The guide's extra end changes nothing: the sweep's end was first, and it is final.
        old = await context_engine.get_session("user-123")
        assert old is not None and (old.status, old.record.end_reason) == ("expired", "idle")
        assert (old.record.run, old.request_count) == (1, 2)
        assert run_rows(task_store) == {}

    asyncio.run(scenario())


def test_a_pool_that_kept_the_id_past_the_sweep_counts_into_the_ended_run_until_looked_up(
    context_engine: ContextEngine, task_store: SessionStore
) -> None:
    """The guide's pool looks a session up once per process. Requests recorded through an id it
    kept while the sweep expired the session are counted, in the expired run (ending is final
    for a run), and the next lookup starts a new run."""

    async def scenario() -> None:
        ten_minutes_ago = datetime.now(UTC) - timedelta(minutes=10)
        context_engine.tracker.record("user-9", at=ten_minutes_ago)
        get_or_create_session = session_pool_of(context_engine)
        session_id = await get_or_create_session("9")  # 10 minutes idle: handed out as it is
        looked_up = await context_engine.get_session(session_id)
        assert looked_up is not None and (looked_up.status, looked_up.record.run) == ("active", 1)
        # An idle sweep with a 5-minute threshold (SESSIONS_MAX_IDLE_SECONDS=300) expires it.
        assert idle_sweep(max_idle_seconds=300) == [session_id]

        assert await get_or_create_session("9") == session_id  # no lookup: the same id
        await serve(context_engine, session_id, requests=2)
        kept = await context_engine.get_session(session_id)
        assert kept is not None and (kept.status, kept.record.run) == ("expired", 1)
        assert kept.request_count == 3 and kept.is_expired()

        fresh = await session_pool_of(context_engine)("9")  # the next process looks it up
        await serve(context_engine, fresh, requests=1)
        session = await context_engine.get_session(fresh)
        assert session is not None and (session.status, session.record.run) == ("active", 2)
        assert session.request_count == 1
        assert run_rows(task_store)[("user-9", 1)]["request_count"] == 3

    asyncio.run(scenario())
