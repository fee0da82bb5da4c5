"""The worker as deployed, with the pool and concurrency Celery gives it (no flags).

The other pipeline tests name their pool; this one runs what `celery -A workers worker` runs
by default, and checks it counts exactly once.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sessions.events import Batch, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.support.services import require_postgres, require_redis, temporary_postgres_database
from tests.support.workers_harness import (
    CeleryProcess,
    claimed_redis_db,
    flush_applied,
    service_environment,
    wait_until,
)

SESSIONS = 40
EVENTS_PER_AGENT = 3000
AGENTS = 3


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_the_default_worker_counts_every_event_once(tmp_path: Path) -> None:
    require_postgres()
    require_redis()
    with ExitStack() as stack:
        url = stack.enter_context(temporary_postgres_database("sessions_default_worker"))
        broker = stack.enter_context(claimed_redis_db())
        settings = Settings(broker_url=broker, database_url=url)
        env = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=url)
        worker = CeleryProcess("worker", ["worker", "--loglevel=INFO"], env, tmp_path)
        stack.callback(worker.stop)
        worker.wait_for_log(r"@\S+ ready\.")

        def agent(number: int) -> None:
            with SessionTracker(settings, spool=None) as tracker:
                for n in range(EVENTS_PER_AGENT):
                    tracker.record(f"s-{n % SESSIONS}", processing_time=0.5, error=n % 10 == 0)
                tracker.end(f"s-{number}", status="failed")
                flush_applied(tracker)

        agents = [threading.Thread(target=agent, args=(n,)) for n in range(AGENTS)]
        for thread in agents:
            thread.start()
        for thread in agents:
            thread.join()

        duplicate = Batch(events=(RecordEvent(session_id="dup", at=datetime.now(UTC)),))
        publisher = CeleryPublisher(settings)
        for _ in range(3):
            publisher(duplicate.to_message())
        publisher.close()
        wait_until(
            lambda: worker.count(rf"batch {duplicate.batch_id}: ") == 3,
            message="the three copies of one batch handled",
        )

        store = SessionStore(url, settings=settings)
        stack.callback(store.dispose)
        totals = store.aggregate()
        assert totals.request_count == AGENTS * EVENTS_PER_AGENT + 1
        assert totals.error_count == AGENTS * EVENTS_PER_AGENT // 10
        assert totals.total_processing_time == AGENTS * EVENTS_PER_AGENT * 0.5
        dup = store.get("dup")
        assert dup is not None and dup.request_count == 1
        assert {s.session_id for s in store.list_sessions(status="failed")} == {
            f"s-{n}" for n in range(AGENTS)
        }
        assert store.dead_letters() == []
