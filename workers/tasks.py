"""The tasks: ``sessions.ingest`` applies one batch; four sweeps run the housekeeping.

Each task is one call into the process's :class:`SessionStore` and a log line saying what
changed. Delivery is at least once (``acks_late``); the store's ledger makes a redelivered
batch change nothing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import timedelta
from typing import Any

from celery import Task
from sqlalchemy.exc import (
    DataError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from sessions.errors import StoreUnavailableError
from sessions.events import peek_batch_id
from sessions.records import DeadLetterReason
from sessions.settings import get_settings
from sessions.store import SessionStore
from workers import metrics
from workers.app import app

log = logging.getLogger(__name__)

#: The database is away: retry with backoff, for as long as it takes.
OUTAGE_ERRORS = (
    StoreUnavailableError,
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeoutError,
)
#: The payload itself is at fault: it would fail the same way on every attempt.
PERMANENT_ERRORS = (ValueError, TypeError, DataError)
#: First retry countdown after an outage, in seconds; it doubles on every retry ...
RETRY_BACKOFF_BASE = 1.0
#: ... up to this (kept far below the Redis visibility timeout, see celeryconfig).
RETRY_BACKOFF_MAX = 300.0
#: Retries of an unexpected error before the batch is dead-lettered instead.
UNEXPECTED_ERROR_RETRIES = 5

_store: SessionStore | None = None
_store_lock = threading.Lock()


def get_store() -> SessionStore:
    """The process's store, created from settings on first use (after any fork)."""
    global _store
    with _store_lock:
        if _store is None:
            _store = SessionStore.from_settings(get_settings())
        return _store


def reset_store_after_fork() -> None:
    """Forget the parent's pool without closing its connections (they are the parent's)."""
    global _store
    if _store is not None:
        _store.engine.dispose(close=False)
    _store = None


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: doubling, capped, with full jitter."""
    ceiling = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


@app.task(name="sessions.ingest", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def ingest(self: Task, batch: Any) -> dict[str, int]:
    """Apply one batch of events exactly once; its invalid events are dead-lettered.

    A database outage retries the same message (same ``batch_id``) with exponential backoff,
    forever; a payload that can never be applied is dead-lettered with its reason.
    """
    batch_id = peek_batch_id(batch)
    try:
        if self.request.delivery_info and self.request.delivery_info.get("redelivered"):
            poison = _poison_reason(self.request.id)
            if poison:
                return _dead_letter(self, batch, poison, "poison")
        started = time.perf_counter()
        result = get_store().apply(batch)
        seconds = time.perf_counter() - started
    except OUTAGE_ERRORS as exc:
        countdown = backoff(self.request.retries)
        log.warning(
            "batch %s: database unavailable (%s); retry %d in %.1f s",
            batch_id,
            _short(exc),
            self.request.retries + 1,
            countdown,
        )
        raise self.retry(exc=exc, countdown=countdown) from exc
    except PERMANENT_ERRORS as exc:
        return _dead_letter(self, batch, f"cannot be applied: {_short(exc)}", "cannot_apply")
    except Exception as exc:
        if self.request.retries >= UNEXPECTED_ERROR_RETRIES:
            return _dead_letter(
                self,
                batch,
                f"failed {self.request.retries + 1} times: {_short(exc)}",
                "unexpected_error",
            )
        log.exception("batch %s: unexpected error; will retry", batch_id)
        raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from exc
    metrics.record_apply(result, seconds)
    log.info(
        "batch %s: %d events applied, %d duplicate, %d dead-lettered",
        batch_id,
        result.applied,
        result.duplicate,
        result.rejected,
    )
    return {"applied": result.applied, "duplicate": result.duplicate, "rejected": result.rejected}


def _poison_reason(message_id: str) -> str | None:
    """Why a redelivered message should be set aside, or ``None`` to handle it again.

    With ``task_reject_on_worker_lost`` a message whose handling kills the worker process
    comes back forever; counting its redeliveries (committed before each attempt) bounds that.
    """
    redeliveries = get_store().count_redelivery(message_id)
    limit = get_settings().max_redeliveries
    if redeliveries <= limit:
        log.warning("message %s redelivered unfinished (%d of %d)", message_id, redeliveries, limit)
        return None
    return (
        f"redelivered unfinished {redeliveries} times (more than max_redeliveries={limit}): "
        "handling it kills the worker"
    )


def _dead_letter(task: Task, batch: Any, reason: str, kind: DeadLetterReason) -> dict[str, int]:
    """Set ``batch`` aside with ``reason``, counted as ``kind``; retried if the database is away."""
    try:
        get_store().dead_letter(batch, reason)
    except OUTAGE_ERRORS as exc:
        raise task.retry(exc=exc, countdown=backoff(task.request.retries)) from exc
    metrics.record_dead_letter(kind)
    log.error("dead-lettered a batch: %s", reason)
    return {"applied": 0, "duplicate": 0, "rejected": 1}


@app.task(name="sessions.expire_idle")  # type: ignore[untyped-decorator]
def expire_idle(max_idle_seconds: float | None = None) -> list[str]:
    """End as ``expired`` every active session idle longer than ``max_idle_seconds``."""
    result = get_store().expire_idle(max_idle_seconds)
    _log_sweep("idle sweep expired", result.changed)
    metrics.record_sweep(result, get_store().count_active)
    return list(result.changed)


@app.task(name="sessions.expire_older_than")  # type: ignore[untyped-decorator]
def expire_older_than(max_age_days: float | None = None) -> list[str]:
    """End as ``expired`` every active session created more than ``max_age_days`` ago."""
    max_age = None if max_age_days is None else timedelta(days=max_age_days)
    result = get_store().expire_older_than(max_age)
    _log_sweep("age sweep expired", result.changed)
    metrics.record_sweep(result, get_store().count_active)
    return list(result.changed)


@app.task(name="sessions.sweep_health")  # type: ignore[untyped-decorator]
def sweep_health(
    warn_rate: float | None = None,
    fail_rate: float | None = None,
    min_requests: int | None = None,
) -> dict[str, list[str]]:
    """End as ``failed`` the sessions erring above ``fail_rate``; warn above ``warn_rate``."""
    result = get_store().sweep_health(warn_rate, fail_rate, min_requests)
    _log_sweep("health sweep failed", result.changed)
    if result.warned:
        log.warning(
            "health sweep: %d sessions above the warning error rate: %s",
            len(result.warned),
            _sample(result.warned),
        )
    metrics.record_sweep(result, get_store().count_active)
    return {"failed": list(result.changed), "warned": list(result.warned)}


@app.task(name="sessions.purge")  # type: ignore[untyped-decorator]
def purge() -> dict[str, int]:
    """Delete ended sessions, past runs and ledger rows older than their retention."""
    result = get_store().purge()
    log.info(
        "purge removed %d sessions, %d past runs, %d ledger rows, %d dead letters",
        result.sessions,
        result.runs,
        result.ledger,
        result.dead_letters,
    )
    return result.model_dump()


def _log_sweep(what: str, changed: tuple[str, ...]) -> None:
    log.info("%s %d sessions%s", what, len(changed), f": {_sample(changed)}" if changed else "")


def _sample(ids: tuple[str, ...], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown} (and {len(ids) - limit} more)"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
