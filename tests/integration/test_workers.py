"""The Celery side for real: tracker -> Redis -> `celery -A workers worker` -> PostgreSQL.

Each worker here is a real subprocess on a fresh PostgreSQL database (which the worker itself
migrates at start) and a Redis database of its own. The tasks' error handling is also
checked in-process, on both backends.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, OperationalError

from sessions.errors import BrokerUnavailableError
from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from sessions.worker import tasks
from tests.integration.support import record_message
from tests.support.services import POSTGRES_ADMIN_URL
from tests.support.workers_harness import (
    Pipeline,
    SilentServer,
    TcpProxy,
    flush_applied,
    running_pipeline,
    wait_until,
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """One worker shared by the tests that only add sessions of their own."""
    with running_pipeline(tmp_path_factory.mktemp("pipeline")) as running:
        yield running


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


# -- tracker -> broker -> worker -> database --------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_a_fresh_database_is_migrated_by_the_worker_and_counts_are_exact(
    pipeline: Pipeline,
) -> None:
    assert "is at the newest schema" in pipeline.worker.log
    user = _user()
    sessions = [f"{user}-device-{n}" for n in range(25)]
    expected_requests = dict.fromkeys(sessions, 0)
    expected_errors = dict.fromkeys(sessions, 0)
    lock = threading.Lock()

    with SessionTracker(pipeline.settings, max_batch_events=200) as tracker:
        for session_id in sessions:
            tracker.create(session_id, user_id=user, metadata={"agent": "test"})

        def agent(number: int) -> None:
            for index in range(2500):
                session_id = sessions[(index * 7 + number) % len(sessions)]
                error = (index + number) % 9 == 0
                tracker.record(session_id, processing_time=0.25, error=error, user_id=user)
                with lock:
                    expected_requests[session_id] += 1
                    expected_errors[session_id] += error

        agents = [threading.Thread(target=agent, args=(n,)) for n in range(4)]
        for thread in agents:
            thread.start()
        for thread in agents:
            thread.join()
        for session_id in sessions[:5]:
            tracker.end(session_id, status="completed")
        flush_applied(tracker)
        stats = tracker.stats

    assert stats.events_sent == stats.events_recorded == 25 + 10_000 + 5
    assert stats.batches_failed == 0
    totals = pipeline.store.aggregate(user_id=user)
    assert totals.sessions == 25
    assert totals.request_count == 10_000
    assert totals.error_count == sum(expected_errors.values())
    assert totals.total_processing_time == pytest.approx(2500.0)
    for session_id in sessions:
        record = pipeline.store.get(session_id)
        assert record is not None
        assert record.request_count == expected_requests[session_id]
        assert record.error_count == expected_errors[session_id]
        assert record.metadata == {"agent": "test"}
        assert record.status == ("completed" if session_id in sessions[:5] else "active")


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_a_batch_published_three_times_is_counted_once(pipeline: Pipeline) -> None:
    now = datetime.now(UTC)
    events = tuple(
        RecordEvent(session_id="dup-1", at=now, processing_time=1.0, error=n == 0)
        for n in range(10)
    )
    batch = Batch(events=events)
    publisher = CeleryPublisher(pipeline.settings)
    for _ in range(3):
        publisher(batch.to_message())
    publisher.close()

    wait_until(
        lambda: pipeline.worker.count(rf"batch {batch.batch_id}: ") == 3,
        message="all three messages processed",
    )
    record = pipeline.store.get("dup-1")
    assert record is not None
    assert (record.request_count, record.error_count) == (10, 1)
    assert pipeline.worker.count(rf"batch {batch.batch_id}: 10 events applied") == 1
    assert pipeline.worker.count(rf"batch {batch.batch_id}: 0 events applied, 10 duplicate") == 2


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_poison_payloads_are_dead_lettered_with_their_reason(pipeline: Pipeline) -> None:
    publisher = CeleryPublisher(pipeline.settings)
    good = RecordEvent(session_id="poison-ok", at=datetime.now(UTC)).model_dump(mode="json")
    bad = dict(good, processing_time=-5)
    batch_id = str(uuid.uuid4())
    publisher({"batch_id": batch_id, "events": [good, bad, good]})
    publisher({"batch_id": "not-a-uuid", "events": []})
    publisher.close()

    wait_until(
        lambda: len(pipeline.store.dead_letters()) >= 2, message="two dead-lettered payloads"
    )
    reasons = {letter.reason for letter in pipeline.store.dead_letters()}
    assert "batch_id: must be a UUID" in reasons
    assert any(r.startswith("events[1]: record.processing_time: must be") for r in reasons)
    record = pipeline.store.get("poison-ok")
    assert record is not None and record.request_count == 2


# -- failures: the database away, the broker away -------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_a_database_outage_during_ingest_is_retried_to_exact_counts(tmp_path: Path) -> None:
    server = make_url(POSTGRES_ADMIN_URL)
    proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432)

    def through_proxy(url: str) -> str:
        return make_url(url).set(port=proxy.port).render_as_string(hide_password=False)

    try:
        with running_pipeline(tmp_path, database_url=through_proxy) as pipeline:
            proxy.cut()
            user = _user()
            with SessionTracker(pipeline.settings, max_batch_events=100) as tracker:
                for index in range(1000):
                    tracker.record(f"{user}-{index % 10}", error=index % 4 == 0, user_id=user)
                tracker.flush()
                wait_until(
                    lambda: pipeline.worker.count("database unavailable") >= 10,
                    message="every batch to fail on the database at least once",
                )
                assert pipeline.store.aggregate(user_id=user).request_count == 0
                proxy.restore()
                flush_applied(tracker)

            totals = pipeline.store.aggregate(user_id=user)
            assert (totals.sessions, totals.request_count, totals.error_count) == (10, 1000, 250)
            assert pipeline.store.dead_letters() == []
    finally:
        proxy.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("broker", ["refusing", "silent"])
def test_a_broker_that_is_down_never_blocks_record(tmp_path: Path, broker: str) -> None:
    silent = SilentServer() if broker == "silent" else None
    port = silent.port if silent else 1
    settings = Settings(
        broker_url=f"redis://127.0.0.1:{port}/0", database_url=f"sqlite:///{tmp_path / 's.db'}"
    )
    try:
        tracker = SessionTracker(settings, max_batch_events=100)
        # A silent broker never answers a publish: a record that waited on one would not
        # return at all. The worst call is printed for the record (timings are not asserted).
        slowest = 0.0
        for index in range(5000):
            began = time.perf_counter()
            tracker.record(f"s-{index % 10}", processing_time=0.1)
            slowest = max(slowest, time.perf_counter() - began)
        tracker.flush()
        print(f"worst record() with the broker {broker}: {slowest * 1e6:.0f} us")

        if broker == "refusing":
            wait_until(lambda: tracker.stats.events_pending == 0, message="every batch given up")
            assert tracker.stats.events_failed == 5000
            with pytest.raises(BrokerUnavailableError, match=r"redis://127\.0\.0\.1:1/0"):
                tracker.flush(wait=True, timeout=10)
        tracker.close(timeout=1.0)
        assert tracker.stats.events_sent == 0
    finally:
        if silent:
            silent.close()


# -- beat ---------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_beat_runs_every_sweep_on_its_schedule(tmp_path: Path) -> None:
    every_second = {
        f"SESSIONS_{name}_INTERVAL": "1"
        for name in ("IDLE_SWEEP", "AGE_SWEEP", "HEALTH_SWEEP", "PURGE")
    }
    with running_pipeline(tmp_path, beat=True, **every_second) as pipeline:
        store = pipeline.store
        now = datetime.now(UTC)
        hours, days = timedelta(hours=1), timedelta(days=1)
        old_batch = Batch(events=(RecordEvent(session_id="ledger-old", at=now - 20 * days),))
        store.apply(old_batch, now=now - 20 * days)
        store.apply(
            Batch(
                events=(
                    CreateEvent(session_id="idle-1", at=now - 2 * hours),
                    RecordEvent(session_id="idle-1", at=now - 2 * hours),
                    CreateEvent(session_id="old-1", at=now - 8 * days),
                    RecordEvent(session_id="old-1", at=now),
                    CreateEvent(session_id="gone-1", at=now - 40 * days),
                    EndEvent(session_id="gone-1", at=now - 40 * days),
                    *(RecordEvent(session_id="sick-1", at=now, error=n < 6) for n in range(10)),
                    *(RecordEvent(session_id="warn-1", at=now, error=n < 4) for n in range(10)),
                    RecordEvent(session_id="fine-1", at=now),
                )
            )
        )

        def ended(session_id: str, status: str, reason: str) -> bool:
            record = store.get(session_id)
            return record is not None and (record.status, record.end_reason) == (status, reason)

        wait_until(lambda: ended("idle-1", "expired", "idle"), message="the idle sweep")
        wait_until(lambda: ended("old-1", "expired", "age"), message="the age sweep")
        wait_until(lambda: ended("sick-1", "failed", "health"), message="the health sweep")
        wait_until(lambda: store.get("gone-1") is None, message="the purge")
        assert store.applied_batch_ids([old_batch.batch_id]) == set()
        for session_id in ("warn-1", "fine-1"):
            record = store.get(session_id)
            assert record is not None and record.status == "active"

        worker = pipeline.worker
        worker.wait_for_log(r"above the warning error rate: .*warn-1")
        # Each change is logged once, by the run that made it (ledger-old is swept too).
        assert worker.count(r"idle sweep expired \d+ sessions: .*\bidle-1\b") == 1
        assert worker.count(r"age sweep expired \d+ sessions: .*\bold-1\b") == 1
        assert worker.count(r"health sweep failed 1 sessions: sick-1") == 1
        assert worker.count(r"purge removed [1-9]\d* sessions") >= 1
        assert pipeline.beat is not None
        for task in ("expire_idle", "expire_older_than", "sweep_health", "purge"):
            assert pipeline.beat.count(rf"Sending due task .*\(sessions\.{task}\)") >= 1


# -- the ingest task in-process: what is retried, what is dead-lettered ----------------------


def _message(session_id: str = "s-1", events: int = 3) -> dict[str, Any]:
    return record_message(session_id, events)


def test_ingest_retries_a_database_outage_until_the_batch_is_applied(
    task_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_apply = task_store.apply
    failures = iter(range(4))

    def flaky_apply(batch: Any, now: datetime | None = None) -> Any:
        if next(failures, None) is not None:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return real_apply(batch, now)

    monkeypatch.setattr(task_store, "apply", flaky_apply)
    result = tasks.ingest.apply(args=[_message()])
    assert result.get() == {"applied": 3, "duplicate": 0, "rejected": 0}
    record = task_store.get("s-1")
    assert record is not None and record.request_count == 3
    assert task_store.dead_letters() == []


def test_ingest_dead_letters_a_batch_the_database_refuses(
    task_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(batch: Any, now: datetime | None = None) -> Any:
        raise DataError("INSERT", {}, Exception("value out of range"))

    monkeypatch.setattr(task_store, "apply", refuse)
    message = _message()
    tasks.ingest.apply(args=[message])
    (letter,) = task_store.dead_letters()
    assert letter.reason.startswith("cannot be applied: DataError")
    assert message["batch_id"] in letter.payload


def test_ingest_dead_letters_after_repeated_unexpected_errors(
    task_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def broken(batch: Any, now: datetime | None = None) -> Any:
        calls.append(1)
        raise RuntimeError("bug")

    monkeypatch.setattr(task_store, "apply", broken)
    tasks.ingest.apply(args=[_message()])
    assert len(calls) == tasks.UNEXPECTED_ERROR_RETRIES + 1
    (letter,) = task_store.dead_letters()
    assert "RuntimeError: bug" in letter.reason


def test_ingest_dead_letters_an_unusable_envelope(task_store: SessionStore) -> None:
    result = tasks.ingest.apply(args=[["not", "a", "batch"]])
    assert result.get() == {"applied": 0, "duplicate": 0, "rejected": 1}
    (letter,) = task_store.dead_letters()
    assert letter.reason == "batch: must be a JSON object, got list"
