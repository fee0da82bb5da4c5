"""A batch that can be neither applied nor dead-lettered is retried, never acknowledged.

Celery acknowledges a task that raises, so the ingest task must not raise anything but a
retry while its batch is in neither place. Here the store's database is broken for real (a
dropped ledger table, a read-only connection) on both backends, the task runs in-process
(eager retries, no countdown), and the fault is repaired after the task has gone past the
point where it would dead-letter: the batch must then be applied, once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery.canvas import Signature
from celery.exceptions import Reject, Retry
from sqlalchemy import text

from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import ledger_table
from sessions.worker import tasks
from tests.integration.support import record_message

#: Attempts before the test repairs the fault: past the dead-letter attempt.
REPAIR_AFTER = tasks.UNEXPECTED_ERROR_RETRIES + 3


def _repair_after(
    attempts: int, monkeypatch: pytest.MonkeyPatch, repair: Callable[[], None]
) -> list[str]:
    """Count the task's store calls (apply, dead_letter); ``repair`` once ``attempts`` applies
    have failed, before the next one (between two deliveries, as an operator would).
    Returns what each call did, in order."""
    calls: list[str] = []
    store_class = SessionStore
    real_apply, real_dead_letter = store_class.apply, store_class.dead_letter

    def apply(self: SessionStore, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if calls.count("apply failed") == attempts and "repaired" not in calls:
            repair()
            calls.append("repaired")
            self = tasks.get_store()  # the repair may have replaced the task's store
        try:
            result = real_apply(self, batch, *args, **kwargs)
        except Exception:
            calls.append("apply failed")
            raise
        calls.append("applied")
        return result

    def dead_letter(self: SessionStore, payload: Any, reason: str) -> None:
        try:
            real_dead_letter(self, payload, reason)
        except Exception:
            calls.append("dead letter failed")
            raise
        calls.append("dead-lettered")

    monkeypatch.setattr(store_class, "apply", apply)
    monkeypatch.setattr(store_class, "dead_letter", dead_letter)
    return calls


def test_a_dropped_ledger_keeps_the_batch_until_it_is_back(
    task_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def repair() -> None:
        ledger_table.create(task_store.engine)

    with task_store.engine.begin() as connection:
        connection.execute(text("DROP TABLE applied_batches"))
    try:
        calls = _repair_after(REPAIR_AFTER, monkeypatch, repair)
        message = record_message("ledger-dropped", events=3)
        result = tasks.ingest.apply(args=[message])
        assert result.get() == {"applied": 3, "duplicate": 0, "rejected": 0}
    finally:
        ledger_table.create(task_store.engine, checkfirst=True)
    # On PostgreSQL a missing table is an error of the statement (ProgrammingError): after
    # its retries the task tried to dead-letter the batch, which failed too (the ledger is
    # where a dead letter claims it). SQLite reports it as an OperationalError, which the
    # task treats as the database being away: retried without end, never set aside.
    expected = "dead letter failed" if task_store.engine.dialect.name == "postgresql" else None
    assert expected is None or expected in calls, calls
    assert calls.count("apply failed") == REPAIR_AFTER, calls
    assert calls[-1] == "applied" and calls.count("applied") == 1, calls
    record = task_store.get("ledger-dropped")
    assert record is not None and record.request_count == 3
    batch_id = uuid.UUID(message["batch_id"])
    assert task_store.applied_batch_ids([batch_id]) == {batch_id}
    assert task_store.dead_letters() == []


def test_a_read_only_database_keeps_the_batch_until_it_is_writable(
    task_store: SessionStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's store opened read-only: every write is refused by the database itself
    # (SQLite PRAGMA query_only, PostgreSQL default_transaction_read_only).
    read_only = SessionStore(task_store.url, settings=settings, read_only=True)
    monkeypatch.setattr(tasks, "_store", read_only)
    try:
        calls = _repair_after(
            REPAIR_AFTER, monkeypatch, lambda: setattr(tasks, "_store", task_store)
        )
        message = record_message("read-only", events=4)
        result = tasks.ingest.apply(args=[message])
        assert result.get() == {"applied": 4, "duplicate": 0, "rejected": 0}
    finally:
        read_only.dispose()
    assert calls.count("apply failed") == REPAIR_AFTER and calls[-1] == "applied", calls
    assert "dead-lettered" not in calls
    record = task_store.get("read-only")
    assert record is not None and record.request_count == 4
    assert task_store.dead_letters() == []


def test_a_retry_that_cannot_be_published_rejects_the_message_back_to_its_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Celery turns a failed retry publish into Reject(requeue=False), which drops the message.
    def refuse(self: Signature, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("broker refused the publish")

    slept: list[float] = []
    monkeypatch.setattr(Signature, "apply_async", refuse)
    monkeypatch.setattr(tasks.time, "sleep", slept.append)
    tasks.ingest.push_request(
        id="m-1", args=["{}"], kwargs={}, retries=2, called_directly=False, is_eager=False
    )
    try:
        short = tasks.retry_later(tasks.ingest, RuntimeError("x"), countdown=3.0)
        long = tasks.retry_later(tasks.ingest, RuntimeError("x"), countdown=1000.0)
    finally:
        tasks.ingest.pop_request()
    assert isinstance(short, Reject) and short.requeue is True
    assert isinstance(long, Reject) and long.requeue is True
    assert slept == [3.0, tasks.REQUEUE_DELAY_MAX]


def test_a_retry_that_is_published_is_raised_as_celerys_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    published: list[dict[str, Any]] = []

    def publish(self: Signature, *args: Any, **kwargs: Any) -> Any:
        published.append(dict(self.options))

    monkeypatch.setattr(Signature, "apply_async", publish)
    tasks.ingest.push_request(
        id="m-2", args=["{}"], kwargs={}, retries=0, called_directly=False, is_eager=False
    )
    try:
        outcome = tasks.retry_later(tasks.ingest, RuntimeError("x"), countdown=5.0)
    finally:
        tasks.ingest.pop_request()
    assert isinstance(outcome, Retry)
    assert [options.get("countdown") for options in published] == [5.0]
