"""Scenario 2: PostgreSQL stopped for several seconds mid-ingest, then started again.

The database is a private cluster of this test's own (never the machine's shared server). A
producer records throughout; the server is stopped (``immediate``: as a crash would, or ``fast``:
as an operator would) while batches are being applied, stays down for several seconds while
every batch the worker takes fails and is retried with backoff, and is started again. The worker
process must survive, and the database must end with exactly the events sent: nothing
dead-lettered, nothing lost to a transaction cut off mid-commit, nothing counted twice by a
retry whose first attempt did commit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sessions.settings import Settings
from sessions.tracker import SessionTracker
from tests.faults.harness import (
    Fleet,
    Monitor,
    Producer,
    Reference,
    ReferenceRecorder,
    compare,
    deadline_passed,
    record_outcome,
    service_environment,
    settle,
    wait_until,
)
from tests.faults.report import scaled
from tests.faults.servers import FaultBroker, private_postgres

pytestmark = [pytest.mark.slow]

#: How long each outage lasts at least (it also lasts until the worker has retried a few times).
OUTAGE_SECONDS = 5.0
#: Stop modes, taken in turn: a crash first, then an orderly shutdown.
STOP_MODES = ("immediate", "fast")


def test_postgres_down_for_seconds_mid_ingest_is_retried_to_exact_counts(
    tmp_path: Path, fault_broker: FaultBroker
) -> None:
    began = time.monotonic()
    outages = scaled(1)
    reference = Reference()
    with private_postgres() as postgres:
        url = postgres.create_database("faults_outage")
        broker = fault_broker.url
        environment = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=url)
        settings = Settings(broker_url=broker, database_url=url)
        sessions = [f"outage-{n}" for n in range(20)]
        with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
            worker = fleet.worker(concurrency=2)
            tracker = SessionTracker(settings, max_batch_events=50, flush_interval=0.02)
            recorder = ReferenceRecorder(tracker, reference)
            producer = Producer(recorder, sessions, rate=500)
            producer.start()
            try:
                for number in range(outages):
                    mode = STOP_MODES[number % len(STOP_MODES)]
                    applied = monitor.ledger_count()
                    wait_until(
                        lambda applied=applied: monitor.ledger_count() >= applied + 5,  # type: ignore[misc]
                        message="batches being applied before the outage",
                    )
                    failures = worker.count("database unavailable")
                    postgres.stop(mode)
                    stopped = time.monotonic()
                    wait_until(
                        lambda failures=failures, stopped=stopped: (  # type: ignore[misc]
                            worker.count("database unavailable") >= failures + 3
                            and deadline_passed(stopped, OUTAGE_SECONDS)
                        ),
                        timeout=60,
                        message="the worker to retry batches through the outage",
                    )
                    postgres.start()
                    assert worker.process.poll() is None, "the worker died in the outage"
                    applied = monitor.ledger_count()
                    wait_until(
                        lambda applied=applied: monitor.ledger_count() > applied,  # type: ignore[misc]
                        timeout=60,
                        message="the worker to apply batches again after the outage",
                    )
            finally:
                producer.stop()
            problem = settle(tracker, fault_broker)
            tracker.close()

            outcome = compare(reference, url)
            row = record_outcome(
                fault_broker.label("2 PostgreSQL down mid-ingest"), outcome, began, recorder
            )
            row.dead_lettered = monitor.dead_letter_count()
            log = worker.log
            retries = worker.count("database unavailable")
            unexpected = worker.count("unexpected error")
            row.notes.append(
                f"{outages} outage(s) of >= {OUTAGE_SECONDS:g} s "
                f"({', '.join(STOP_MODES[n % 2] for n in range(outages))}); {retries} retries, "
                f"{unexpected} unexpected errors; worker pid {worker.process.pid} throughout"
            )

            assert worker.process.poll() is None, f"the worker exited:\n{log[-3000:]}"
            assert problem is None, problem
            assert outcome.exact, outcome.describe()
            assert row.dead_lettered == 0
            assert "WorkerLostError" not in log
