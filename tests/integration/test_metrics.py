"""The worker's Prometheus endpoint tells what the database holds.

A real prefork worker (Redis broker, PostgreSQL store) ingests what agents record, batches
published more than once, and batches with invalid events or no usable envelope; sweeps end
sessions. Its endpoint is read over HTTP during and after, and once the figures settle each
one must equal its counterpart in the database: request sums, ledger rows, dead letters by
reason, ended sessions, active sessions. Which reason each failure of the ingest task is
counted under is checked in-process.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.exc import DataError

from sessions.events import Batch, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import dead_letters_table, ledger_table, runs_table, sessions_table
from sessions.tracker import SessionTracker
from sessions.worker import metrics, tasks
from sessions.worker.celery_app import create_app
from sessions.worker.metrics import DEAD_LETTER_REASONS, WorkerMetrics
from tests.integration.support import record_message
from tests.support.workers_harness import (
    Pipeline,
    Scrape,
    flush_applied,
    free_port,
    running_pipeline,
    scrape_metrics,
    wait_until,
)

AGENTS = 2
EVENTS_PER_AGENT = 4000
SESSIONS = 25
#: Batches published ``COPIES`` times each: all but one copy are duplicates.
DUPLICATED_BATCHES, COPIES, DUPLICATED_EVENTS = 3, 3, 7
#: Batches holding one invalid event among ``GOOD_EVENTS`` good ones.
INVALID_BATCHES, GOOD_EVENTS = 4, 3
#: Every counter that must never go down between two scrapes.
COUNTERS = (
    "sessions_events_applied_total",
    "sessions_events_duplicate_total",
    "sessions_batches_applied_total",
    "sessions_batches_duplicate_total",
    "sessions_batch_apply_seconds_count",
    "sessions_batch_commit_lag_seconds_count",
)


def _database(store: SessionStore) -> dict[str, int]:
    """What the database holds, as the metrics should tell it."""
    s, r, d = sessions_table.c, runs_table.c, dead_letters_table.c
    with store.engine.connect() as connection:

        def scalar(query: Any) -> int:
            return int(connection.execute(query).scalar_one())

        def ended(reason: str) -> int:
            return scalar(select(func.count()).where(s.end_reason == reason))

        return {
            # Every event sent is a record that counts a request.
            "requests": scalar(select(func.coalesce(func.sum(s.request_count), 0)))
            + scalar(select(func.coalesce(func.sum(r.request_count), 0))),
            "ledger": scalar(select(func.count()).select_from(ledger_table)),
            "dead_letters": scalar(select(func.count()).select_from(dead_letters_table)),
            "invalid_event": scalar(select(func.count()).where(d.reason.startswith("events["))),
            "malformed_batch": scalar(select(func.count()).where(d.batch_id.is_(None))),
            "ended_idle": ended("idle"),
            "ended_health": ended("health"),
            "active": store.count_active(),
        }


def _differences(scrape: Scrape, database: dict[str, int]) -> list[str]:
    """Each figure of the endpoint that differs from the database's (empty: all equal)."""

    def dead(reason: str) -> float | None:
        return scrape.value("sessions_dead_letters_total", reason=reason)

    def swept(sweep: str, result: str) -> float | None:
        return scrape.value("sessions_swept_sessions_total", sweep=sweep, result=result)

    pairs = {
        "events applied = request sums": (
            scrape.value("sessions_events_applied_total"),
            database["requests"],
        ),
        "batches applied = ledger rows": (
            scrape.value("sessions_batches_applied_total"),
            database["ledger"],
        ),
        "apply-time observations = ledger rows": (
            scrape.value("sessions_batch_apply_seconds_count"),
            database["ledger"],
        ),
        "lag observations = ledger rows (each has applied events)": (
            scrape.value("sessions_batch_commit_lag_seconds_count"),
            database["ledger"],
        ),
        "dead letters = dead_letters rows": (
            sum(dead(reason) or 0 for reason in DEAD_LETTER_REASONS),
            database["dead_letters"],
        ),
        "invalid_event = rows of invalid events": (
            dead("invalid_event"),
            database["invalid_event"],
        ),
        "malformed_batch = rows without a batch id": (
            dead("malformed_batch"),
            database["malformed_batch"],
        ),
        "idle sweep ended = sessions ended idle": (
            swept("expire_idle", "ended"),
            database["ended_idle"],
        ),
        "health sweep ended = sessions ended unhealthy": (
            swept("sweep_health", "ended"),
            database["ended_health"],
        ),
        "active sessions gauge = active sessions": (
            scrape.value("sessions_active_sessions"),
            database["active"],
        ),
    }
    return [f"{name}: {got} != {want}" for name, (got, want) in pairs.items() if got != want]


class Scraper:
    """Reads the endpoint over and over in a thread, checking every counter only grows."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes: list[Scrape] = []
        self.problems: list[str] = []
        self.first = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                scrape = scrape_metrics(self.port)
            except Exception as exc:  # reported by the test, not lost in a thread
                self.problems.append(f"scrape failed: {exc!r}")
                return
            if self.scrapes:
                for name in COUNTERS:
                    before, now = self.scrapes[-1].value(name), scrape.value(name)
                    if before is None or now is None or now < before:
                        self.problems.append(f"{name} went from {before} to {now}")
            self.scrapes.append(scrape)
            self.first.set()
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _swept(port: int, sweep: str) -> float | None:
    return scrape_metrics(port).value("sessions_swept_sessions_total", sweep=sweep, result="ended")


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[tuple[Pipeline, int]]:
    port = free_port()
    with running_pipeline(tmp_path, SESSIONS_METRICS_PORT=str(port)) as running:
        yield running, port


def _publish_extras(settings: Settings) -> int:
    """Old sessions for the sweeps, duplicated batches, invalid events, a bad envelope.

    Returns how many requests of these the database should come to hold.
    """
    now = datetime.now(UTC)
    publisher = CeleryPublisher(settings)
    try:
        seeds = [
            *(RecordEvent(session_id=f"idle-{n}", at=now - timedelta(hours=2)) for n in range(3)),
            *(RecordEvent(session_id="sick-1", at=now, error=n < 6) for n in range(10)),
            *(RecordEvent(session_id="warn-1", at=now, error=n < 4) for n in range(10)),
        ]
        publisher(Batch(events=tuple(seeds)).to_message())
        for copy in range(DUPLICATED_BATCHES):
            events = (RecordEvent(session_id=f"dup-{copy}", at=now),) * DUPLICATED_EVENTS
            message = Batch(events=events).to_message()
            for _ in range(COPIES):
                publisher(message)
        for number in range(INVALID_BATCHES):
            message = record_message(f"invalid-{number}", GOOD_EVENTS)
            message["events"].append(dict(message["events"][0], processing_time=-5))
            publisher(message)
        publisher({"batch_id": "not-a-uuid", "events": []})
    finally:
        publisher.close()
    return len(seeds) + DUPLICATED_BATCHES * DUPLICATED_EVENTS + INVALID_BATCHES * GOOD_EVENTS


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_the_endpoint_counts_what_the_database_holds(pipeline: tuple[Pipeline, int]) -> None:
    running, port = pipeline
    assert f"metrics at http://127.0.0.1:{port}/metrics" in running.worker.log
    scraper = Scraper(port)
    failures: list[str] = []
    try:

        def agent(number: int) -> None:
            with SessionTracker(running.settings, spool=None) as tracker:
                for n in range(EVENTS_PER_AGENT):
                    if n == EVENTS_PER_AGENT // 2:
                        try:
                            wait_until(scraper.first.is_set, message="a scrape mid-ingest")
                        except AssertionError as exc:
                            failures.append(str(exc))
                    session = f"agent-{(n * 7 + number) % SESSIONS}"
                    tracker.record(session, processing_time=0.25, error=n % 10 == 0)
                flush_applied(tracker)

        agents = [threading.Thread(target=agent, args=(n,)) for n in range(AGENTS)]
        for thread in agents:
            thread.start()
        requests = AGENTS * EVENTS_PER_AGENT + _publish_extras(running.settings)
        for thread in agents:
            thread.join()
        assert failures == []

        def all_in_database() -> bool:
            held = _database(running.store)
            return held["requests"] == requests and held["dead_letters"] == INVALID_BATCHES + 1

        wait_until(all_in_database, message="every batch in the database")
        # The sweeps one after the other, so the last count of active sessions is taken
        # after every change.
        app = create_app(running.settings)
        try:
            app.send_task("sessions.expire_idle", kwargs={"max_idle_seconds": 3600})
            wait_until(lambda: _swept(port, "expire_idle") == 3, message="the idle sweep")
            app.send_task("sessions.sweep_health")
            wait_until(lambda: _swept(port, "sweep_health") == 1, message="the health sweep")
        finally:
            app.close()

        def settled() -> bool:
            return not _differences(scrape_metrics(port), _database(running.store))

        try:
            wait_until(settled, message="the endpoint to equal the database")
        except AssertionError:
            raise AssertionError(
                "\n".join(_differences(scrape_metrics(port), _database(running.store)))
            ) from None
    finally:
        scraper.stop()

    assert scraper.problems == []
    assert len(scraper.scrapes) > 1
    final = scrape_metrics(port)
    assert final.value("sessions_events_duplicate_total") == (
        DUPLICATED_BATCHES * (COPIES - 1) * DUPLICATED_EVENTS
    )
    assert final.value("sessions_batches_duplicate_total") == DUPLICATED_BATCHES * (COPIES - 1)
    assert final.value("sessions_swept_sessions_total", sweep="sweep_health", result="warned") == 1
    for reason in ("refused_by_database", "poison", "cannot_apply", "unexpected_error"):
        assert final.value("sessions_dead_letters_total", reason=reason) == 0
    count = final.value("sessions_batch_apply_seconds_count")
    assert final.value("sessions_batch_apply_seconds_bucket", le="+Inf") == count


# -- the ingest task's failures, in-process: which reason each is counted under ---------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    """Metrics on in this process, in a registry of the test's own."""
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", WorkerMetrics(registry))
    return registry


def _dead_letters(registry: CollectorRegistry) -> dict[str, float]:
    counted = {
        reason: registry.get_sample_value("sessions_dead_letters_total", {"reason": reason})
        for reason in DEAD_LETTER_REASONS
    }
    return {reason: value for reason, value in counted.items() if value}


def test_a_batch_the_database_refuses_is_counted_as_cannot_apply(
    task_store: SessionStore, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(batch: Any, now: datetime | None = None) -> Any:
        raise DataError("INSERT", {}, Exception("value out of range"))

    monkeypatch.setattr(task_store, "apply", refuse)
    tasks.ingest.apply(args=[record_message()])
    assert _dead_letters(registry) == {"cannot_apply": 1} and len(task_store.dead_letters()) == 1


def test_a_batch_failing_unexpectedly_every_time_is_counted_as_unexpected_error(
    task_store: SessionStore, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(batch: Any, now: datetime | None = None) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(task_store, "apply", broken)
    tasks.ingest.apply(args=[record_message()])
    assert _dead_letters(registry) == {"unexpected_error": 1}


def test_a_poison_message_is_counted_as_poison(
    task_store: SessionStore, registry: CollectorRegistry
) -> None:
    message = record_message("poisoned", events=2)
    task_id = f"task-{uuid.uuid4()}"
    for _ in range(task_store.settings.max_redeliveries + 1):
        tasks.ingest.push_request(id=task_id, delivery_info={"redelivered": True})
        try:
            tasks.ingest.run(message)
        finally:
            tasks.ingest.pop_request()
    assert _dead_letters(registry) == {"poison": 1}
    assert registry.get_sample_value("sessions_events_applied_total") == 2


def test_invalid_events_and_bad_envelopes_are_counted_by_the_store_reason(
    task_store: SessionStore, registry: CollectorRegistry
) -> None:
    message = record_message("some-bad", events=2)
    message["events"].append(dict(message["events"][0], processing_time=-1))
    tasks.ingest.apply(args=[message])
    tasks.ingest.apply(args=[["not", "a", "batch"]])
    assert _dead_letters(registry) == {"invalid_event": 1, "malformed_batch": 1}
    assert len(task_store.dead_letters()) == 2


def test_a_sweep_task_counts_what_it_ended_and_the_active_sessions(
    task_store: SessionStore, registry: CollectorRegistry
) -> None:
    old = datetime.now(UTC) - timedelta(hours=2)
    task_store.apply(
        Batch(events=tuple(RecordEvent(session_id=f"s-{n}", at=old) for n in range(3)))
    )
    task_store.apply(Batch(events=(RecordEvent(session_id="fresh", at=datetime.now(UTC)),)))
    assert tasks.expire_idle.apply(kwargs={"max_idle_seconds": 3600}).get() == [
        "s-0",
        "s-1",
        "s-2",
    ]
    labels = {"sweep": "expire_idle", "result": "ended"}
    assert registry.get_sample_value("sessions_swept_sessions_total", labels) == 3
    assert registry.get_sample_value("sessions_active_sessions") == 1 == task_store.count_active()
