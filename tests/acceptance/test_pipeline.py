"""The whole pipeline as a user runs it: environment variables, `celery -A workers worker`
and `... beat`, and agents recording through ``SessionTracker()``.

Once on the embedded default (filesystem broker, SQLite: nothing to install) and once on
Redis and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sessions.settings import get_settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.support.services import require_postgres, require_redis, temporary_postgres_database
from tests.support.workers_harness import (
    claimed_redis_db,
    flush_applied,
    service_environment,
    start_beat,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.slow

#: Sweeps every second, so the test sees them act; thresholds stay the guide's.
FAST_SWEEPS = {
    "SESSIONS_IDLE_SWEEP_INTERVAL": "1",
    "SESSIONS_HEALTH_SWEEP_INTERVAL": "1",
    "SESSIONS_AGE_SWEEP_INTERVAL": "1",
}


@pytest.fixture(params=["embedded", "redis+postgresql"])
def environment(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """``SESSIONS_*`` for this process and the Celery subprocesses alike."""
    with ExitStack() as stack:
        if request.param == "embedded":
            values = {
                "SESSIONS_BROKER_URL": "filesystem://",
                "SESSIONS_BROKER_DIR": str(tmp_path / "broker"),
                "SESSIONS_DATABASE_URL": f"sqlite:///{tmp_path / 'sessions.db'}",
            }
        else:
            require_redis()
            require_postgres()
            values = {
                "SESSIONS_BROKER_URL": stack.enter_context(claimed_redis_db()),
                "SESSIONS_DATABASE_URL": stack.enter_context(
                    temporary_postgres_database("sessions_acceptance")
                ),
            }
        values.update(FAST_SWEEPS)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        stack.callback(get_settings.cache_clear)
        yield service_environment(**values)
        monkeypatch.undo()


def test_agents_workers_and_beat_end_to_end(environment: dict[str, str], tmp_path: Path) -> None:
    worker = start_worker(environment, tmp_path)
    beat = None
    try:
        beat = start_beat(environment, tmp_path)
        now = datetime.now(UTC)
        users = [f"user-{n}" for n in range(5)]
        plan = {
            f"{user}-device-{n}": (user, kind)
            for index, user in enumerate(users)
            for n, kind in enumerate(("healthy", "healthy", "failing", "idle", "done"))
            if index or kind != "done"
        }
        with SessionTracker() as tracker:  # configured from the environment, as agents are
            for session_id, (user, kind) in plan.items():
                when = now - timedelta(hours=1) if kind == "idle" else None
                tracker.create(session_id, user_id=user, metadata={"kind": kind}, at=when)
                for request in range(20):
                    error = kind == "failing" and request % 5 < 3  # 60 % errors
                    tracker.record(
                        session_id, processing_time=0.2, error=error, user_id=user, at=when
                    )
                if kind == "done":
                    tracker.end(session_id, status="completed")
            flush_applied(tracker)
            assert tracker.stats.events_sent == tracker.stats.events_recorded == 24 * 21 + 4

        store = SessionStore.from_settings(get_settings())
        try:
            totals = store.aggregate()
            assert (totals.sessions, totals.request_count, totals.error_count) == (24, 480, 60)
            for user in users:
                sessions_of_user = 4 if user == "user-0" else 5
                assert store.aggregate(user_id=user).request_count == 20 * sessions_of_user

            def settled() -> bool:
                for session_id, (_, kind) in plan.items():
                    record = store.get(session_id)
                    assert record is not None
                    expected = {"failing": "failed", "idle": "expired", "done": "completed"}
                    if record.status != expected.get(kind, "active"):
                        return False
                return True

            wait_until(settled, message="the sweeps to end the failing and idle sessions")
            failed = store.get("user-1-device-2")
            assert failed is not None and failed.end_reason == "health"
            assert failed.error_rate == pytest.approx(0.6)
            idle = store.get("user-1-device-3")
            assert idle is not None and idle.end_reason == "idle"
        finally:
            store.dispose()
    finally:
        if beat is not None:
            beat.stop()
        worker.stop()
