"""SessionRecord and the guide's GuideSession: derived metrics and is_expired, exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sessions.context_engine import GuideSession
from sessions.records import Aggregate, SessionRecord

NOW = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def session(**fields: Any) -> SessionRecord:
    values: dict[str, Any] = {
        "session_id": "user-123",
        "user_id": "user-456",
        "status": "active",
        "end_reason": None,
        "run": 1,
        "created_at": NOW - timedelta(hours=1),
        "last_activity": NOW,
        "ended_at": None,
        "request_count": 0,
        "error_count": 0,
        "total_processing_time": 0.0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost": 0.0,
        "metadata": None,
    }
    values.update(fields)
    return SessionRecord(**values)


def test_rates_are_zero_without_requests() -> None:
    record = session(error_count=0, total_processing_time=3.0)
    assert record.error_rate == 0.0
    assert record.average_processing_time == 0.0


def test_rates_divide_by_requests() -> None:
    record = session(request_count=4, error_count=1, total_processing_time=3.0)
    assert record.error_rate == 0.25
    assert record.average_processing_time == 0.75


def test_derived_fields_are_serialized() -> None:
    dumped = session(request_count=2, error_count=1).model_dump(mode="json")
    assert dumped["error_rate"] == 0.5
    assert dumped["average_processing_time"] == 0.0


def test_aggregate_rates_are_zero_without_requests() -> None:
    empty = Aggregate(
        sessions=0,
        request_count=0,
        error_count=0,
        total_processing_time=0.0,
        input_tokens=0,
        output_tokens=0,
        cost=0.0,
    )
    assert (empty.error_rate, empty.average_processing_time) == (0.0, 0.0)
    full = empty.model_copy(
        update={"request_count": 8, "error_count": 2, "total_processing_time": 4.0}
    )
    assert (full.error_rate, full.average_processing_time) == (0.25, 0.5)


@pytest.mark.parametrize(
    ("idle", "expired"),
    [
        (timedelta(0), False),
        (timedelta(seconds=1799), False),
        (timedelta(seconds=1800), False),  # the guide: idle *longer* than max_idle_seconds
        (timedelta(seconds=1800, microseconds=1), True),
        (timedelta(hours=5), True),
    ],
)
def test_active_session_expires_after_max_idle_seconds(idle: timedelta, expired: bool) -> None:
    record = session(last_activity=NOW - idle)
    assert record.is_expired(now=NOW) is expired
    assert record.is_expired(1800, now=NOW) is expired


def test_max_idle_seconds_is_honoured() -> None:
    record = session(last_activity=NOW - timedelta(seconds=61))
    assert record.is_expired(max_idle_seconds=60, now=NOW)
    assert not record.is_expired(max_idle_seconds=120, now=NOW)


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
@pytest.mark.parametrize("idle", [timedelta(0), timedelta(seconds=1), timedelta(days=30)])
def test_an_ended_session_is_expired_however_recent_its_activity(
    status: str, idle: timedelta
) -> None:
    """The guide's pool re-creates a session when ``is_expired()``: it must never hand out an
    ended run (recording into it would never make it active again)."""
    record = session(
        status=status, end_reason="idle", last_activity=NOW - idle, ended_at=NOW - idle
    )
    assert record.is_expired(now=NOW) is True
    assert record.is_expired(max_idle_seconds=10**9, now=NOW) is True


def test_is_expired_defaults_to_the_wall_clock() -> None:
    stale = session(last_activity=datetime.now(UTC) - timedelta(seconds=1801))
    fresh = session(last_activity=datetime.now(UTC) - timedelta(seconds=60))
    assert stale.is_expired() and not fresh.is_expired()


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan"), float("inf")])
def test_a_max_idle_that_is_not_a_finite_duration_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^max_idle_seconds: must be a finite number of seconds"):
        session().is_expired(max_idle_seconds=bad, now=NOW)


@pytest.mark.parametrize("status", ["active", "completed", "failed", "expired"])
@pytest.mark.parametrize("idle_seconds", [0, 1799, 1801, 7200])
def test_the_guides_session_answers_as_its_record(status: str, idle_seconds: int) -> None:
    """``GuideSession.is_expired`` (naive datetimes, the wall clock) is the record's rule."""
    now = datetime.now(UTC)
    record = session(status=status, last_activity=now - timedelta(seconds=idle_seconds))
    guide = GuideSession.from_record(record)
    assert guide.is_expired() is record.is_expired()
    assert guide.is_expired(max_idle_seconds=3600) is record.is_expired(max_idle_seconds=3600)
    assert guide.is_expired() is (status != "active" or idle_seconds > 1800)
