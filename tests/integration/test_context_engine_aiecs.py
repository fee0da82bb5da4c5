"""``ContextEngine`` as aiecs 2.2.0 calls it: signatures and returns, the conversation (read
back at once, without waiting for the workers), requests counted from its turns, dict access.

A tracker whose publisher applies each batch to the test's store (or holds it, to show what a
read sees before the workers apply it) stands in for the broker and the worker;
tests/acceptance/test_aiecs_agent.py runs a real aiecs agent against a real worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from sessions import conversation
from sessions.context_engine import ContextEngine
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.support.waiting import wait_for

Publish = Callable[[dict[str, Any]], None]


class Pipeline:
    """Applies each published batch to the store, or holds it while ``holding``."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.holding = False
        self.held: list[dict[str, Any]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        if self.holding:
            self.held.append(message)
        else:
            self.store.apply(message)

    def release(self) -> None:
        self.holding = False
        for message in self.held:
            self.store.apply(message)
        self.held.clear()


@pytest.fixture
def pipeline(store: SessionStore) -> Pipeline:
    return Pipeline(store)


@pytest.fixture
def engine_of(
    store: SessionStore, settings: Settings, pipeline: Pipeline
) -> Iterator[Callable[..., ContextEngine]]:
    trackers: list[SessionTracker] = []

    def make(**options: Any) -> ContextEngine:
        tracker = SessionTracker(settings, publisher=pipeline, store=store, spool=None)
        trackers.append(tracker)
        engine = ContextEngine(settings, tracker=tracker, store=store, **options)
        assert asyncio.run(engine.initialize()) is True
        return engine

    yield make
    for tracker in trackers:
        tracker.close()


@pytest.fixture
def engine(engine_of: Callable[..., ContextEngine]) -> ContextEngine:
    return engine_of()


async def turn(engine: ContextEngine, session_id: str, question: str, answer: str | None) -> None:
    """One task as aiecs's memory plugin brackets it: read the history, then write the turn."""
    await engine.get_conversation_history(session_id=session_id, limit=50)
    await engine.add_conversation_message(session_id=session_id, role="user", content=question)
    if answer is not None:
        await engine.add_conversation_message(
            session_id=session_id, role="assistant", content=answer, metadata={}
        )


def test_the_history_shows_this_engines_messages_before_the_workers_apply_them(
    engine: ContextEngine, pipeline: Pipeline, store: SessionStore
) -> None:
    async def scenario() -> None:
        await turn(engine, "user-1", "Hello", "Hi")
        await asyncio.to_thread(engine.tracker.flush, wait=True)
        pipeline.holding = True
        await turn(engine, "user-1", "Again", "Hi again")
        engine.tracker.flush()  # published, held: not in the store yet
        history = await engine.get_conversation_history("user-1")
        assert [(m.role, m.content) for m in history] == [
            ("user", "Hello"),
            ("assistant", "Hi"),
            ("user", "Again"),
            ("assistant", "Hi again"),
        ]
        assert [m.content for m in store.conversation("user-1")] == ["Hello", "Hi"]
        assert [m.content for m in await engine.get_conversation_history("user-1", 3)] == [
            "Hi",
            "Again",
            "Hi again",
        ]
        pipeline.release()
        again = await engine.get_conversation_history("user-1")
        assert [m.message_id for m in again] == [m.message_id for m in history]  # none twice

    asyncio.run(scenario())


def test_an_answer_after_reading_the_history_sorts_after_it_whatever_the_clocks(
    engine_of: Callable[..., ContextEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two agent processes on one session, the second one's clock ten seconds behind."""
    first, second = engine_of(), engine_of()

    async def scenario() -> None:
        await first.add_conversation_message("user-1", "user", "Question")
        await asyncio.to_thread(first.tracker.flush, wait=True)
        behind = conversation.time.time_ns() - 10 * 10**9
        monkeypatch.setattr(conversation.time, "time_ns", lambda: behind)
        seen = await second.get_conversation_history("user-1")
        assert [m.content for m in seen] == ["Question"]
        await second.add_conversation_message("user-1", "assistant", "Answer")
        await asyncio.to_thread(second.tracker.flush, wait=True)
        assert [m.content for m in await first.get_conversation_history("user-1")] == [
            "Question",
            "Answer",
        ]

    asyncio.run(scenario())


def test_answered_turns_count_requests_and_unanswered_ones_errors(engine: ContextEngine) -> None:
    async def scenario() -> None:
        for n in range(3):
            await turn(engine, "user-1", f"Request {n}", f"Answer {n}")
        await turn(engine, "user-1", "Failing", None)  # the task failed: no answer written
        await turn(engine, "user-1", "Request 3", "Answer 3")
        await turn(engine, "user-1", "Left open", None)
        assert await engine.end_session("user-1", status="completed") is True
        session = await engine.get_session("user-1")
        assert session is not None
        assert (session.request_count, session.error_count, session.status) == (6, 2, "completed")
        assert session.total_processing_time > 0 and session.processing_time_p95 is not None

    asyncio.run(scenario())


def test_with_inference_off_only_update_session_counts(
    engine_of: Callable[..., ContextEngine],
) -> None:
    engine = engine_of(infer_requests=False)

    async def scenario() -> None:
        await turn(engine, "user-1", "Hello", "Hi")
        await engine.update_session("user-1", increment_requests=True, add_processing_time=0.5)
        session = await engine.get_session("user-1")
        assert session is not None
        assert (session.request_count, session.total_processing_time) == (1, 0.5)

    asyncio.run(scenario())


def test_the_calls_aiecs_makes_have_its_signatures_and_returns(engine: ContextEngine) -> None:
    async def scenario() -> None:
        # aiecs's own helpers pass ``updates`` second, positionally, and expect bools.
        assert await engine.update_session("user-1", {}) is True
        assert await engine.update_session("user-1", None, True, 0.25, True) is True
        with pytest.raises(ValueError, match=r"updates: not supported \(got keys \['status'\]\)"):
            await engine.update_session("user-1", {"status": "completed"})
        with pytest.raises(ValueError, match=r"updates: must be a dict or None \(got bool\)"):
            await engine.update_session("user-1", True)  # type: ignore[arg-type]
        # aiecs's ConversationMemory.clear_conversation_history ends a session "cleared".
        assert await engine.end_session("user-1", status="cleared") is True
        session = await engine.get_session("user-1")
        assert session is not None
        assert (session.status, session.request_count, session.error_count) == ("completed", 1, 1)
        with pytest.raises(ValueError, match="status: must be completed, failed, expired or"):
            await engine.end_session("user-1", status="archived")
        with pytest.raises(ValidationError, match="role"):
            await engine.add_conversation_message("user-1", "User", "Hello")
        with pytest.raises(ValueError, match="limit: must be an integer from 1 to 10000"):
            await engine.get_conversation_history("user-1", limit=0)

    asyncio.run(scenario())


def test_turns_after_a_clear_start_a_new_run(engine: ContextEngine) -> None:
    """Review of issue 13: aiecs clears a conversation with ``end_session(.., "cleared")`` and
    goes on; those later turns counted in the ended run, on a ``completed`` session."""

    async def scenario() -> None:
        await turn(engine, "user-1", "Hello", "Hi")
        await turn(engine, "user-1", "Again", "Hi again")
        assert await engine.end_session("user-1", status="cleared") is True
        ended = await engine.get_session("user-1")
        assert ended is not None and (ended.status, ended.request_count) == ("completed", 2)
        await turn(engine, "user-1", "Fresh start", "Hello again")
        session = await engine.get_session("user-1")
        assert session is not None
        assert (session.status, session.request_count, session.record.run) == ("active", 1, 2)
        history = await engine.get_conversation_history("user-1")
        assert [m.content for m in history] == ["Fresh start", "Hello again"]

    asyncio.run(scenario())


def test_cleanup_expired_sessions_takes_hours(engine: ContextEngine) -> None:
    async def scenario() -> None:
        engine.tracker.record("idle", at=datetime.now(UTC) - timedelta(hours=3))
        await engine.update_session("busy", increment_requests=True)
        assert await engine.cleanup_expired_sessions(max_idle_hours=2) == 1
        idle, busy = await engine.get_session("idle"), await engine.get_session("busy")
        assert idle is not None and (idle.status, idle.record.end_reason) == ("expired", "idle")
        assert busy is not None and busy.status == "active"
        for hours in (-1, 0, float("nan"), 1e300):
            with pytest.raises(ValueError, match=r"^max_idle_hours: must be a finite number of h"):
                await engine.cleanup_expired_sessions(max_idle_hours=hours)
        assert (await engine.get_session("busy")).status == "active"  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_sessions_and_messages_serve_attributes_and_keys(engine: ContextEngine) -> None:
    async def scenario() -> None:
        created = await engine.create_session("user-1", user_id="user-456", metadata={"a": 1})
        assert created["status"] == created.status == "active"
        await turn(engine, "user-1", "Hello", "Hi")
        session = await engine.get_session("user-1")
        assert session is not None
        assert session["request_count"] == session.request_count == 1
        assert session.get("user_id") == "user-456" and session.get("nope", 7) == 7
        assert "total_processing_time" in session and "nope" not in session
        as_dict = session.to_dict()
        assert dict(session) == as_dict and json.loads(json.dumps(as_dict)) == as_dict
        assert as_dict["created_at"] == session.created_at.isoformat()
        with pytest.raises(KeyError):
            session["nope"]
        (question, answer) = await engine.get_conversation_history("user-1")
        assert (question["role"], question.content) == ("user", "Hello")
        assert answer.get("content") == "Hi"
        assert set(answer.to_dict()) == {"role", "content", "timestamp", "metadata"}
        assert answer.timestamp.tzinfo is None  # naive UTC, as aiecs's engine gives

    asyncio.run(scenario())


def test_a_new_run_starts_with_an_empty_conversation(engine: ContextEngine) -> None:
    async def scenario() -> None:
        await turn(engine, "user-1", "Hello", "Hi")
        await engine.end_session("user-1")
        await engine.create_session("user-1", user_id="user-456")
        assert await engine.get_conversation_history("user-1") == []
        await turn(engine, "user-1", "Again", "Hi again")
        assert [m.content for m in await engine.get_conversation_history("user-1")] == [
            "Again",
            "Hi again",
        ]
        session = await engine.get_session("user-1")
        assert session is not None and (session.record.run, session.request_count) == (2, 1)

    asyncio.run(scenario())


def test_checkpoints_through_the_engine_as_aiecs_reads_them(engine: ContextEngine) -> None:
    async def scenario() -> None:
        assert await engine.store_checkpoint("agent-1", "v1", {"state": {"n": 1}}) is True
        assert await engine.put_checkpoint("agent-1", "v2", {"state": {"n": 2}}, {"k": "v"})
        latest = await engine.get_checkpoint("agent-1")
        assert latest is not None and latest["checkpoint_id"] == "v2"
        assert (latest["data"], latest["metadata"], latest["thread_id"]) == (
            {"state": {"n": 2}},
            {"k": "v"},
            "agent-1",
        )
        assert datetime.fromisoformat(latest["created_at"]) <= datetime.now(UTC)
        first = await engine.get_checkpoint("agent-1", checkpoint_id="v1")
        assert first is not None and first["metadata"] == {}
        listed = await engine.list_checkpoints("agent-1", limit=10)
        assert [c["checkpoint_id"] for c in listed] == ["v2", "v1"]
        assert await engine.put_writes("agent-1", "v2", "task-1", [("channel", 1)]) is True
        assert await engine.get_writes("agent-1", "v2") == [("channel", 1)]
        with pytest.raises(ValueError, match="limit: must be an integer from 1 to 10000"):
            await engine.list_checkpoints("agent-1", limit=-1)

    asyncio.run(scenario())


def test_an_own_message_the_runs_bound_drops_is_not_shown(database_url: str) -> None:
    """An engine's unapplied message that the run's retention will drop as soon as it is
    applied (three newer ones are stored, and the run keeps three) is not read back either."""
    bounded = Settings(conversation_max_messages=3)
    store = SessionStore(database_url, settings=bounded)
    pipeline = Pipeline(store)
    trackers = [
        SessionTracker(bounded, publisher=pipeline, store=store, spool=None) for _ in range(2)
    ]
    slow, other = (ContextEngine(bounded, tracker=t, store=store) for t in trackers)

    async def scenario() -> None:
        await slow.initialize()
        await other.initialize()
        pipeline.holding = True
        await slow.add_conversation_message("user-1", "user", "Held back")
        slow.tracker.flush(wait=False)
        await asyncio.to_thread(
            lambda: wait_for(lambda: pipeline.held, "the held batch", stall=30)
        )
        pipeline.holding = False
        for n in range(3):
            await other.add_conversation_message("user-1", "assistant", f"Newer {n}")
        await asyncio.to_thread(other.tracker.flush, wait=True)
        expected = ["Newer 0", "Newer 1", "Newer 2"]
        assert [m.content for m in await slow.get_conversation_history("user-1")] == expected
        pipeline.release()
        assert [m.content for m in store.conversation("user-1")] == expected

    try:
        asyncio.run(scenario())
    finally:
        for tracker in trackers:
            tracker.close()
        store.dispose()
