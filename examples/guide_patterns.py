"""Every pattern of the session-management guide, run against this project.

The guide's code is kept as written, with ``from sessions import ContextEngine`` in place of
its import; each pattern then checks what the guide says should happen. It needs a running
worker (``sessions worker``) on the configured broker and database::

    SESSIONS_BROKER_URL=redis://127.0.0.1:6379/0 \\
    SESSIONS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
    python examples/guide_patterns.py

The guide's ``HybridAgent`` tracks a request per ``execute_task``; :class:`Agent` below does
the same through ``update_session``, so the patterns read as in the guide.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sessions import ContextEngine, GuideSession

logger = logging.getLogger("guide")
MAX_SESSIONS = 3
RUN = uuid.uuid4().hex[:8]


def sid(name: str) -> str:
    """A session id unique to this run, so the example can run again on the same database."""
    return f"{name}-{RUN}"


class TaskFailed(Exception):
    pass


class Agent:
    """Stands in for the guide's agent: each task is one tracked request."""

    def __init__(self, context_engine: ContextEngine, fail_every: int = 0):
        self.context_engine = context_engine
        self.fail_every = fail_every
        self.calls = 0

    async def execute_task(self, task: dict[str, Any], context: dict[str, Any]) -> str:
        self.calls += 1
        start = time.perf_counter()
        failed = bool(self.fail_every) and self.calls % self.fail_every == 0
        await self.context_engine.update_session(
            session_id=context["session_id"],
            increment_requests=True,
            add_processing_time=time.perf_counter() - start,
            mark_error=failed,
        )
        if failed:
            raise TaskFailed(task["description"])
        return f"done: {task['description']}"


async def basic_lifecycle(context_engine: ContextEngine) -> str:
    agent = Agent(context_engine)
    session_id = sid("user-123")
    await agent.execute_task({"description": "Hello"}, {"session_id": session_id})
    for i in range(5):
        await agent.execute_task({"description": f"Request {i}"}, {"session_id": session_id})
    await context_engine.end_session(session_id, status="completed")
    session = await context_engine.get_session(session_id)
    assert session is not None and session.request_count == 6 and session.status == "completed"
    return f"auto-created, 6 requests, {session.status}"


async def explicit_creation(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-explicit")
    session_metrics = await context_engine.create_session(
        session_id=session_id,
        user_id=sid("user-456"),
        metadata={"source": "web", "device": "mobile", "ip_address": "192.168.1.1"},
    )
    agent = Agent(context_engine)
    await agent.execute_task({"description": "Hello"}, {"session_id": session_id})
    await context_engine.end_session(session_id, status="completed")
    session = await context_engine.get_session(session_id)
    assert session is not None and session.metadata and session.metadata["device"] == "mobile"
    assert session_metrics.status == "active" and session.status == "completed"
    return f"metadata kept, {session.request_count} request, {session.status}"


async def status_management(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-status")
    session = await context_engine.create_session(session_id=session_id, user_id=sid("user-456"))
    assert session.status == "active"
    agent = Agent(context_engine)
    for i in range(10):
        await agent.execute_task({"description": f"Request {i}"}, {"session_id": session_id})
    session = await context_engine.get_session(session_id)
    assert session is not None
    if session.is_expired(max_idle_seconds=1800):
        await context_engine.end_session(session_id, status="expired")
    await context_engine.end_session(session_id, status="completed")
    session = await context_engine.get_session(session_id)
    assert session is not None and session.status == "completed" and session.request_count == 10
    return "active -> 10 requests -> completed"


async def identification(context_engine: ContextEngine) -> str:
    agent = Agent(context_engine)
    user_id = sid("456")
    ids = [
        f"user-{user_id}",
        f"user-{user_id}-device-device-789",
        f"user-{user_id}-app-web-app",
        f"temp-{uuid.uuid4()}",
    ]
    for session_id in ids:
        await agent.execute_task({"description": "Hello"}, {"session_id": session_id})
    await context_engine.end_session(ids[-1], status="completed")
    sessions = [await context_engine.get_session(session_id) for session_id in ids]
    assert all(s is not None and s.request_count == 1 for s in sessions)
    assert sessions[-1] is not None and sessions[-1].status == "completed"
    return "user, device, app and temporary ids each tracked separately"


async def request_tracking(context_engine: ContextEngine) -> str:
    agent = Agent(context_engine)
    session_id = sid("user-123-tracking")
    for i in range(10):
        await agent.execute_task({"description": f"Request {i}"}, {"session_id": session_id})
    session = await context_engine.get_session(session_id)
    assert session is not None and session.request_count == 10 and session.error_count == 0
    return f"Request count: {session.request_count}, total {session.total_processing_time:.6f}s"


async def manual_updates(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-manual")
    await context_engine.update_session(
        session_id=session_id, increment_requests=True, add_processing_time=1.5, mark_error=False
    )
    await context_engine.update_session(
        session_id=session_id, increment_requests=True, add_processing_time=0.1, mark_error=True
    )
    session = await context_engine.get_session(session_id)
    assert session is not None
    assert (session.request_count, session.error_count) == (2, 1)
    assert abs(session.total_processing_time - 1.6) < 1e-9
    return f"Requests: 2, Errors: 1, Error rate: {session.error_count / session.request_count:.0%}"


async def aggregation(context_engine: ContextEngine) -> str:
    user_id = sid("user-agg")
    for index, (requests, errors) in enumerate([(4, 1), (6, 0), (10, 3)]):
        session_id = f"{user_id}-s{index}"
        await context_engine.create_session(session_id=session_id, user_id=user_id)
        for n in range(requests):
            await context_engine.update_session(
                session_id, increment_requests=True, add_processing_time=0.5, mark_error=n < errors
            )
    all_sessions = await context_engine.list_sessions(user_id=user_id)
    total_requests = sum(s.request_count for s in all_sessions)
    total_errors = sum(s.error_count for s in all_sessions)
    total_time = sum(s.total_processing_time for s in all_sessions)
    assert (len(all_sessions), total_requests, total_errors) == (3, 20, 4)
    assert abs(total_time / total_requests - 0.5) < 1e-9
    return f"3 sessions, {total_requests} requests, error rate {total_errors / total_requests:.0%}"


async def performance_monitoring(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-perf")
    start = time.time()
    duration = time.time() - start + 0.25
    await context_engine.update_session(
        session_id=session_id,
        increment_requests=True,
        add_processing_time=duration,
        mark_error=False,
    )
    session = await context_engine.get_session(session_id)
    assert session is not None
    avg_time = session.total_processing_time / session.request_count
    assert abs(avg_time - duration) < 1e-9
    return f"Average processing time: {avg_time:.3f}s"


async def automatic_cleanup(context_engine: ContextEngine) -> str:
    idle_id, busy_id = sid("user-idle"), sid("user-busy")
    # An agent that went quiet 45 minutes ago (the tracker takes the event time).
    context_engine.tracker.record(idle_id, at=datetime.now(UTC) - timedelta(minutes=45))
    await context_engine.update_session(busy_id, increment_requests=True)
    cleaned_count = await context_engine.cleanup_inactive_sessions(max_idle_seconds=1800)
    idle = await context_engine.get_session(idle_id)
    busy = await context_engine.get_session(busy_id)
    assert idle is not None and idle.status == "expired"
    assert busy is not None and busy.status == "active"
    assert cleaned_count >= 1
    return f"Cleaned up {cleaned_count} inactive sessions"


async def custom_cleanup(context_engine: ContextEngine) -> str:
    user_id = sid("user-custom")
    bad, good = f"{user_id}-bad", f"{user_id}-good"
    for n in range(4):
        await context_engine.update_session(bad, increment_requests=True, mark_error=n < 3)
        await context_engine.update_session(good, increment_requests=True, mark_error=n < 1)
    for id_ in (bad, good):
        await context_engine.create_session(session_id=id_, user_id=user_id)
    all_sessions = await context_engine.list_sessions(user_id=user_id)
    for session in all_sessions:
        if session.request_count > 0:
            error_rate = session.error_count / session.request_count
            if error_rate > 0.5:
                await context_engine.end_session(session.session_id, status="failed")
                logger.warning(
                    f"Ended session {session.session_id} due to high error rate: {error_rate}"
                )
    statuses = {s.session_id: s.status for s in await context_engine.list_sessions(user_id=user_id)}
    assert statuses == {bad: "failed", good: "active"}, statuses
    return "75% errors -> failed, 25% errors -> still active"


async def cleanup_by_age(context_engine: ContextEngine) -> str:
    user_id = sid("user-age")
    old, new = f"{user_id}-old", f"{user_id}-new"
    context_engine.tracker.create(old, user_id=user_id, at=datetime.now(UTC) - timedelta(days=8))
    context_engine.tracker.record(old, user_id=user_id)
    await context_engine.create_session(session_id=new, user_id=user_id)
    all_sessions = await context_engine.list_sessions(user_id=user_id)
    # The guide's own comparison, with a naive UTC datetime:
    cutoff_date = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=7)
    cleaned_count = 0
    for session in all_sessions:
        if session.created_at < cutoff_date:
            await context_engine.end_session(session.session_id, status="expired")
            cleaned_count += 1
    statuses = {s.session_id: s.status for s in await context_engine.list_sessions(user_id=user_id)}
    assert cleaned_count == 1 and statuses == {old: "expired", new: "active"}, statuses
    return f"Cleaned up {cleaned_count} old sessions"


async def error_tracking(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-errors")
    agent = Agent(context_engine, fail_every=1)
    try:
        await agent.execute_task({"description": "Task"}, {"session_id": session_id})
    except TaskFailed as e:
        # The agent already tracked the failed request; the guide's pattern adds one more.
        await context_engine.update_session(
            session_id=session_id, increment_requests=True, add_processing_time=0.1, mark_error=True
        )
        logger.info(f"Task failed: {e}")
    session = await context_engine.get_session(session_id)
    assert session is not None and session.error_count == 2 and session.request_count == 2
    return "failed task tracked as an error"


async def error_recovery(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-recovery")
    agent = Agent(context_engine, fail_every=1)
    max_retries = 3
    retry_count = 0
    while retry_count < max_retries:
        try:
            await agent.execute_task({"description": "Task"}, {"session_id": session_id})
            break
        except TaskFailed:
            retry_count += 1
            await context_engine.update_session(
                session_id=session_id, increment_requests=True, mark_error=True
            )
            if retry_count >= max_retries:
                await context_engine.end_session(session_id, status="failed")
    session = await context_engine.get_session(session_id)
    assert session is not None and session.status == "failed" and session.error_count == 6
    return "3 retries, then ended as failed"


async def health_monitoring(context_engine: ContextEngine) -> str:
    session_id = sid("user-123-health")
    for n in range(10):
        await context_engine.update_session(session_id, increment_requests=True, mark_error=n < 6)
    session = await context_engine.get_session(session_id)
    assert session is not None
    actions = []
    if session.request_count > 0:
        error_rate = session.error_count / session.request_count
        if error_rate > 0.3:
            logger.warning(f"Session {session.session_id} has high error rate: {error_rate}")
            actions.append("warned")
            if error_rate > 0.5:
                await context_engine.end_session(session.session_id, status="failed")
                actions.append("failed")
    session = await context_engine.get_session(session_id)
    assert session is not None and session.status == "failed" and actions == ["warned", "failed"]
    return "60% errors: warned, then ended as failed"


async def session_limits(context_engine: ContextEngine) -> str:
    owner = sid("user-limit")

    async def active_count() -> int:
        return len([s for s in await context_engine.list_sessions(user_id=owner, status="active")])

    for n in range(MAX_SESSIONS):
        stale = datetime.now(UTC) - timedelta(minutes=20 if n == 0 else 1)
        context_engine.tracker.record(f"{owner}-{n}", user_id=owner, at=stale)
    if await active_count() >= MAX_SESSIONS:
        await context_engine.cleanup_inactive_sessions(max_idle_seconds=900)
        if await active_count() >= MAX_SESSIONS:
            raise Exception("Maximum session limit reached")
    session = await context_engine.create_session(session_id=f"{owner}-new", user_id=owner)
    assert session.status == "active" and await active_count() == MAX_SESSIONS
    return f"limit {MAX_SESSIONS}: reclaimed a 20-minute idle session, then created"


async def timeout_check(
    context_engine: ContextEngine, session_id: str, user_id: str
) -> GuideSession | None:
    """The guide's "Session Timeout" code, for any session id (the guide's ``user-123``)."""
    session = await context_engine.get_session(session_id)
    if session and session.is_expired(max_idle_seconds=1800):
        # Session expired, create new session
        await context_engine.end_session(session_id, status="expired")
        session = await context_engine.create_session(
            session_id=f"{session_id}-new", user_id=user_id
        )
    return session


def session_pool_of(context_engine: ContextEngine) -> Callable[[str], Awaitable[str]]:
    """The guide's "Session Pooling" code; each call makes one agent process's (empty) pool."""
    session_pool: dict[str, Any] = {}

    async def get_or_create_session(user_id: str) -> str:
        """Get existing session or create new one"""
        session_id = f"user-{user_id}"
        if session_id not in session_pool:
            session = await context_engine.get_session(session_id)
            if not session or session.is_expired(max_idle_seconds=1800):
                # Create new session
                session = await context_engine.create_session(
                    session_id=session_id, user_id=user_id
                )
            session_pool[session_id] = session
        return session_id

    return get_or_create_session


async def session_timeout(context_engine: ContextEngine) -> str:
    for swept in (False, True):
        session_id = sid(f"user-123-timeout-{'swept' if swept else 'idle'}")
        context_engine.tracker.record(session_id, at=datetime.now(UTC) - timedelta(hours=1))
        if swept:  # the guide's scheduled cleanup ran first
            await context_engine.cleanup_inactive_sessions(max_idle_seconds=1800)
        session = await timeout_check(context_engine, session_id, sid("user-456"))
        old = await context_engine.get_session(session_id)
        assert old is not None and old.status == "expired"
        assert session is not None and session.session_id == f"{session_id}-new"
        assert session.status == "active"
    return "idle hour, swept or not yet: expired and replaced"


async def session_pooling(context_engine: ContextEngine) -> str:
    get_or_create_session = session_pool_of(context_engine)
    agent = Agent(context_engine)
    for swept in (False, True):
        user_id = sid(f"pool-{'swept' if swept else 'idle'}")
        # A session left idle for an hour: the pool re-creates it under the same id, whether
        # or not the idle sweep (here the guide's cleanup) expired it first.
        context_engine.tracker.record(f"user-{user_id}", at=datetime.now(UTC) - timedelta(hours=1))
        if swept:
            await context_engine.cleanup_inactive_sessions(max_idle_seconds=1800)
            idle = await context_engine.get_session(f"user-{user_id}")
            assert idle is not None and idle.status == "expired"
        session_id = await get_or_create_session(user_id)
        assert await get_or_create_session(user_id) == session_id
        await agent.execute_task({"description": "Task"}, {"session_id": session_id})
        session = await context_engine.get_session(session_id)
        assert session is not None and session.status == "active" and session.request_count == 1
        assert session.record.run == 2
    return "idle session, swept or not yet, re-created as a fresh run, then reused"


PATTERNS: list[Callable[[ContextEngine], Awaitable[str]]] = [
    basic_lifecycle,
    explicit_creation,
    status_management,
    identification,
    request_tracking,
    manual_updates,
    aggregation,
    performance_monitoring,
    automatic_cleanup,
    custom_cleanup,
    cleanup_by_age,
    error_tracking,
    error_recovery,
    health_monitoring,
    session_limits,
    session_timeout,
    session_pooling,
]


async def run_all() -> dict[str, str]:
    """Run every pattern in order; an assertion names the pattern that broke."""
    results = {}
    async with ContextEngine() as context_engine:
        for pattern in PATTERNS:
            results[pattern.__name__] = await pattern(context_engine)
            print(f"ok  {pattern.__name__:<24} {results[pattern.__name__]}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    asyncio.run(run_all())
