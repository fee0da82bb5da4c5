"""Scenario 6: activity racing idle expiry, through the real pipeline.

Sessions idle for two hours are about to be expired by the idle sweep (30 minutes). The sweep
is started and, deterministically, caught in the middle of its statement: the test holds a lock
on a "gate" session that the sweep reaches first (the oldest activity; the database is told to
use the ``(status, last_activity)`` index so the order is the index's), so the sweep's statement
has read its snapshot and is waiting. While it waits, agents record new requests on some of the
sessions the sweep has still to reach -- through a tracker, Redis and the worker, applied and
committed. Then the gate is released and the sweep finishes its statement.

The racing sessions must not be expired (their activity is newer than the cutoff, and the
sweep re-checks its condition on the row it changes), their requests must all count, and the
sessions without new activity must be expired, reported once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from sessions.events import Batch, CreateEvent, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.tracker import SessionTracker
from sessions.worker.celery_app import create_app
from tests.faults.harness import (
    Fleet,
    Monitor,
    Reference,
    ReferenceRecorder,
    compare,
    record_outcome,
    service_environment,
    settle,
    sweep_reports,
    wait_until,
)
from tests.faults.report import scaled
from tests.faults.servers import PrivateRedis

pytestmark = [pytest.mark.slow]

MAX_IDLE_SECONDS = 1800
SWEEP_UPDATE = "UPDATE sessions SET status"


def _seed(round_number: int, racers: int, quiet: int) -> tuple[Batch, str, list[str], list[str]]:
    now = datetime.now(UTC)
    gate = f"r{round_number}-gate"
    racing = [f"r{round_number}-racing-{n}" for n in range(racers)]
    idle = [f"r{round_number}-idle-{n}" for n in range(quiet)]
    events: list[CreateEvent | RecordEvent] = []
    for session_id in [gate, *racing, *idle]:
        at = now - timedelta(hours=3 if session_id == gate else 2)
        events += [
            CreateEvent(session_id=session_id, at=at),
            RecordEvent(session_id=session_id, at=at),
        ]
    return Batch(events=tuple(events)), gate, racing, idle


def test_activity_committed_while_the_idle_sweep_runs_keeps_sessions_alive(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, redis_server.url
    database = make_url(url).database
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        # Make the sweep walk the (status, last_activity) index, oldest activity first, so
        # that it reaches the gate before the racing sessions on every run.
        connection.execute(text(f'ALTER DATABASE "{database}" SET enable_seqscan = off'))
        connection.execute(text(f'ALTER DATABASE "{database}" SET enable_bitmapscan = off'))
    admin.dispose()
    environment = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=url)
    settings = Settings(broker_url=broker, database_url=url)
    rounds = scaled(3)
    reference = Reference()
    racing_all: list[str] = []
    idle_all: list[str] = []
    gates: list[str] = []
    locker = create_engine(url)
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(concurrency=2)
        publisher = CeleryPublisher(settings)
        app = create_app(settings)  # as beat would: one sweep message, now
        tracker = SessionTracker(settings, flush_interval=0.01)
        recorder = ReferenceRecorder(tracker, reference)
        try:
            for number in range(rounds):
                batch, gate, racing, idle = _seed(number, racers=scaled(5), quiet=scaled(5))
                for event in batch.events:
                    if isinstance(event, RecordEvent):  # one request each, no errors or tokens
                        reference.add(event.session_id, False, 0, 0)
                gates.append(gate)
                racing_all += racing
                idle_all += idle
                applied = monitor.ledger_count()
                publisher(batch.to_message())
                wait_until(
                    lambda applied=applied: monitor.ledger_count() > applied,  # type: ignore[misc]
                    message="the sessions seeded",
                )
                reports = worker.count(r"idle sweep expired")
                with locker.connect() as connection, connection.begin() as transaction:
                    connection.execute(
                        text("SELECT 1 FROM sessions WHERE session_id = :id FOR UPDATE"),
                        {"id": gate},
                    )
                    app.send_task(
                        "sessions.expire_idle", kwargs={"max_idle_seconds": MAX_IDLE_SECONDS}
                    )
                    wait_until(
                        lambda: monitor.waiting_on_locks(SWEEP_UPDATE),
                        message="the idle sweep to be waiting mid-statement",
                    )
                    # The race: new activity, through the pipeline, while the sweep runs.
                    for index in range(scaled(20)):
                        recorder.record(racing[index % len(racing)], index)
                    problem = settle(tracker, redis_server.client(), timeout=30)
                    assert problem is None, problem
                    still_running = bool(monitor.waiting_on_locks(SWEEP_UPDATE))
                    assert still_running, "the sweep finished before the activity was applied"
                    assert worker.count(r"idle sweep expired") == reports
                    transaction.rollback()
                wait_until(
                    lambda reports=reports: worker.count(r"idle sweep expired") > reports,  # type: ignore[misc]
                    message="the idle sweep to finish",
                )
        finally:
            tracker.close()
            publisher.close()
            app.close()
            locker.dispose()

        outcome = compare(reference, url)
        with monitor.engine.connect() as connection:
            statuses = dict(
                connection.execute(text("SELECT session_id, status FROM sessions")).all()
            )
        wrongly_expired = [s for s in racing_all if statuses.get(s) != "active"]
        not_expired = [s for s in [*gates, *idle_all] if statuses.get(s) != "expired"]
        reported = sweep_reports(worker.log)["idle"]
        row = record_outcome("6 activity racing idle expiry", outcome, began, recorder)
        row.dead_lettered = monitor.dead_letter_count()
        row.notes.append(
            f"{rounds} rounds: {len(racing_all)} sessions active mid-sweep, "
            f"{len(wrongly_expired)} of them expired; {len(gates) + len(idle_all)} idle sessions, "
            f"{len(not_expired)} of them not expired; sweep reported {reported}"
        )

        assert outcome.exact, outcome.describe()
        assert not wrongly_expired, wrongly_expired
        assert not not_expired, not_expired
        assert reported == len(gates) + len(idle_all)
        assert row.dead_lettered == 0
