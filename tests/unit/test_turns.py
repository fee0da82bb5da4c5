"""Requests inferred from a session's turns, as an aiecs agent's calls make them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sessions.turns import InferredRequest, TurnInference

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def turns(clock: Clock) -> TurnInference:
    return TurnInference(clock=clock)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_an_answered_question_is_a_request_timed_from_the_history_read(
    turns: TurnInference, clock: Clock
) -> None:
    turns.history_read("s")  # the task starts (aiecs's memory plugin, before the task)
    clock.now += 2.0
    assert turns.message("s", "user", at(2)) is None  # written after the task, with its answer
    clock.now += 0.01
    served = turns.message("s", "assistant", at(2.01))
    assert served == InferredRequest("s", pytest.approx(2.01), False, at(2.01))


def test_without_a_history_read_the_time_runs_from_the_question(
    turns: TurnInference, clock: Clock
) -> None:
    turns.message("s", "user", at(0))
    clock.now += 0.5
    served = turns.message("s", "assistant", at(0.5))
    assert served is not None and served.processing_time == pytest.approx(0.5)


def test_a_question_left_unanswered_until_the_next_is_a_failed_request(
    turns: TurnInference, clock: Clock
) -> None:
    turns.history_read("s")
    clock.now += 1.5
    assert turns.message("s", "user", at(1.5)) is None  # the task failed: no answer written
    turns.history_read("s")  # the next task starts
    clock.now += 1.0
    failed = turns.message("s", "user", at(2.5))
    assert failed == InferredRequest("s", pytest.approx(1.5), True, at(1.5))
    clock.now += 0.25
    served = turns.message("s", "assistant", at(2.75))
    # The second question waited for its answer since the read before it.
    assert served is not None and not served.error
    assert served.processing_time == pytest.approx(1.25)


def test_ending_the_session_with_a_question_pending_counts_it_failed(
    turns: TurnInference, clock: Clock
) -> None:
    turns.message("s", "user", at(0))
    failed = turns.session_ended("s")
    assert failed is not None and failed.error and failed.at == at(0)
    assert turns.session_ended("s") is None  # once


def test_nothing_else_is_counted(turns: TurnInference) -> None:
    turns.history_read("s")
    assert turns.message("s", "assistant", at(0)) is None  # an answer to no question seen
    assert turns.message("s", "system", at(1)) is None
    assert turns.message("s", "tool", at(2)) is None
    assert turns.session_ended("s") is None  # reads alone are no request


def test_a_read_during_a_pending_turn_does_not_restart_it(
    turns: TurnInference, clock: Clock
) -> None:
    turns.history_read("s")
    clock.now += 1.0
    turns.message("s", "user", at(1))
    clock.now += 1.0
    turns.history_read("s")  # another reader, between question and answer
    served = turns.message("s", "assistant", at(2))
    assert served is not None and served.processing_time == pytest.approx(2.0)


def test_sessions_are_followed_apart_and_forgotten_beyond_the_bound(clock: Clock) -> None:
    turns = TurnInference(max_sessions=2, clock=clock)
    for session_id in ("a", "b", "c"):
        turns.message(session_id, "user", at(0))
    assert turns.message("a", "assistant", at(1)) is None  # "a" was the least recently used
    assert turns.message("c", "assistant", at(1)) is not None
    turns.forget("b")
    assert turns.message("b", "assistant", at(1)) is None
