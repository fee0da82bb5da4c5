"""Scenario 5: two beat schedulers and two workers running the same sweeps at the same moment.

Both beats send every sweep every second; both workers (two pool processes each) run them.
To make the sweeps really collide, each wave of sessions is locked by the test as soon as it is
applied: every sweep statement that wants one of its rows waits, so several of them pile up on
the same rows (the test waits until at least two statements of one sweep are waiting at once),
and all resume together when the lock is released. Thresholds are tiny (idle after 2 s, too
old after 3 s) so that every session of a wave ends within seconds, many of them eligible for
two sweeps at once (old and failing, idle and too old).

Each session must end exactly once, with one status matching the sweep that ended it, and the
sweeps' logged reports, summed over both workers, must count every ended session exactly once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sessions.events import Batch, CreateEvent, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from tests.faults.harness import (
    Fleet,
    Monitor,
    service_environment,
    sweep_reports,
    wait_until,
)
from tests.faults.report import Row, add, scaled
from tests.faults.servers import PrivateRedis

pytestmark = [pytest.mark.slow]

MAX_IDLE_SECONDS = 2
MAX_AGE_SECONDS = 3
SWEEP_UPDATE = "UPDATE sessions SET status"
#: How each sweep's statement can be told apart in pg_stat_activity.
SWEEP_KINDS = {"idle": "last_activity <", "age": "created_at <", "health": "error_count"}
#: What each sweep makes of a session: (status, end reason).
ENDINGS = {"idle": ("expired", "idle"), "age": ("expired", "age"), "health": ("failed", "health")}


def _wave(number: int, size: int) -> tuple[Batch, list[str]]:
    """A wave of sessions that every sweep will want; odd waves are only idle ones."""
    now = datetime.now(UTC)
    old = now - timedelta(seconds=60)
    events: list[CreateEvent | RecordEvent] = []
    ids: list[str] = []
    groups = ("idle",) if number % 2 else ("old", "sick", "old-sick", "fresh")
    for group in groups:
        for index in range(size):
            session_id = f"w{number}-{group}-{index}"
            ids.append(session_id)
            created = old if group.startswith("old") else now
            events.append(CreateEvent(session_id=session_id, at=created))
            for request in range(4):
                error = "sick" in group and request != 0
                events.append(RecordEvent(session_id=session_id, at=now, error=error))
    return Batch(events=tuple(events)), ids


def _waiting_sweeps(monitor: Monitor) -> dict[str, int]:
    waiting = dict.fromkeys([*SWEEP_KINDS, "other"], 0)
    for backend in monitor.waiting_on_locks(SWEEP_UPDATE):
        kind = next((k for k, marker in SWEEP_KINDS.items() if marker in backend.query), "other")
        waiting[kind] += 1
    return waiting


def test_two_beats_and_two_workers_end_each_session_once(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, redis_server.url
    environment = service_environment(
        SESSIONS_BROKER_URL=broker,
        SESSIONS_DATABASE_URL=url,
        SESSIONS_MAX_IDLE_SECONDS=str(MAX_IDLE_SECONDS),
        SESSIONS_MAX_AGE_DAYS=repr(MAX_AGE_SECONDS / 86400),
        SESSIONS_IDLE_SWEEP_INTERVAL="1",
        SESSIONS_AGE_SWEEP_INTERVAL="1",
        SESSIONS_HEALTH_SWEEP_INTERVAL="1",
    )
    waves = scaled(4, minimum=2)
    size = scaled(10)
    all_ids: list[str] = []
    piled_up: list[dict[str, int]] = []
    events_sent = 0
    locker = create_engine(url)
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        workers = fleet.workers(2, concurrency=2)
        beats = fleet.beats(2)
        publisher = CeleryPublisher(Settings(broker_url=broker, database_url=url))
        try:
            for number in range(waves):
                batch, ids = _wave(number, size)
                all_ids += ids
                events_sent += len(batch.events)
                applied = monitor.ledger_count()
                publisher(batch.to_message())
                wait_until(
                    lambda applied=applied: monitor.ledger_count() > applied,  # type: ignore[misc]
                    message=f"wave {number} applied",
                )
                with locker.connect() as connection, connection.begin() as transaction:
                    connection.execute(
                        text("SELECT 1 FROM sessions WHERE session_id = ANY(:ids) FOR UPDATE"),
                        {"ids": ids},
                    )
                    most: dict[str, int] = {}

                    def piled(most: dict[str, int] = most) -> bool:
                        for kind, count in _waiting_sweeps(monitor).items():
                            most[kind] = max(most.get(kind, 0), count)
                        return max(most.values()) >= 2

                    wait_until(piled, timeout=30, message="two sweeps waiting on the same rows")
                    piled_up.append(most)
                    transaction.rollback()  # all waiting sweeps resume at once

                def ended(ids: list[str] = ids) -> bool:
                    return not monitor.scalar(
                        "SELECT count(*) FROM sessions WHERE session_id = ANY(:ids)"
                        " AND status = 'active'",
                        ids=ids,
                    )

                wait_until(ended, timeout=30, message=f"every session of wave {number} ended")
        finally:
            publisher.close()
            locker.dispose()

        # Let every sweep that could still report something finish: a full sweep interval
        # after the last session ended, both beats have fired again and found nothing.
        def quiet(before: int = sum(b.count("Sending due task") for b in beats)) -> bool:
            return sum(b.count("Sending due task") for b in beats) >= before + 6

        wait_until(quiet, message="one more round of sweeps from both beats")
        with monitor.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT session_id, status, end_reason, ended_at, last_activity, created_at,"
                    " run FROM sessions WHERE session_id = ANY(:ids)"
                ),
                {"ids": all_ids},
            ).all()
            past_runs = connection.execute(text("SELECT count(*) FROM session_runs")).scalar()
        logs = [worker.log for worker in workers]
        reports = sweep_reports("\n".join(logs))
        by_reason = {kind: 0 for kind in ENDINGS}
        for row in rows:
            if row.end_reason in by_reason:
                by_reason[row.end_reason] += 1
        ended_count = sum(by_reason.values())
        double = sum(max(0, reports[k] - by_reason[k]) for k in ENDINGS)
        missed = sum(max(0, by_reason[k] - reports[k]) for k in ENDINGS)
        row_report = add(
            Row(
                scenario="5 concurrent sweeps (sessions)",
                sent=len(all_ids),
                applied=ended_count,
                lost=len(all_ids) - ended_count,
                double=double,
                seconds=time.monotonic() - began,
            )
        )
        row_report.notes.append(
            f"counted in sessions: {len(all_ids)} in {waves} waves ({events_sent} events), "
            f"applied = ended once, double = reported twice; ended by "
            f"idle {by_reason['idle']}, age {by_reason['age']}, health {by_reason['health']}; "
            f"reported {reports}; most sweeps waiting at once per wave {piled_up}"
        )

        assert len(rows) == len(all_ids)
        assert past_runs == 0
        for row in rows:
            assert row.run == 1, row
            assert row.end_reason in ENDINGS, row
            assert row.status == ENDINGS[row.end_reason][0], row
            expected_end = {
                "idle": row.last_activity + timedelta(seconds=MAX_IDLE_SECONDS),
                "age": row.created_at + timedelta(seconds=MAX_AGE_SECONDS),
                "health": row.last_activity,
            }[row.end_reason]
            assert abs((row.ended_at - expected_end).total_seconds()) < 0.01, row
        assert reports == by_reason, f"sweep reports {reports} != sessions ended {by_reason}"
        assert double == missed == 0
        assert all(sweep_reports(log) != {"idle": 0, "age": 0, "health": 0} for log in logs), (
            "one of the two workers never ended a session"
        )
        for beat in beats:
            assert beat.count(r"Sending due task") >= 3
