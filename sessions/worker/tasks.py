"""The tasks: ``sessions.ingest`` applies one batch; four sweeps run the housekeeping.

Each task is one call into the process's :class:`SessionStore` and a log line saying what
changed. Delivery is at least once (``acks_late``); the store's ledger makes a redelivered
batch change nothing.

``sessions.set_aside`` dead-letters a queue item that was no message at all (see
:mod:`sessions.worker.envelopes`).

Once a batch is settled (applied, dropped as a duplicate, or set aside whole), and before its
message is acknowledged, the worker marks it settled on a Redis broker
(:mod:`sessions.redis_confirming`), where its agent looks without needing the database.

An ingest message ends in exactly one of three places: applied (its batch id in the
ledger), set aside (in ``dead_letters``, its batch id claimed), or back on the queue. Celery
acknowledges a task that raises (``task_acks_on_failure_or_timeout`` is true by default, and
with it false the message is rejected without requeue: gone either way), so no exception but
Celery's own ``Retry`` and ``Reject`` leaves :func:`ingest`: whatever could not be applied nor
set aside is retried later, as a new message published before this one is acknowledged.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry
from sqlalchemy.exc import (
    DataError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from sessions.bounds import REFUSED_ARGUMENTS, check_days
from sessions.decoding import build_models
from sessions.errors import StoreUnavailableError, first_line
from sessions.plain import claimed_batch_uuid, peek_batch_id
from sessions.records import DeadLetterReason
from sessions.redis_confirming import ConfirmationMarks
from sessions.settings import get_settings
from sessions.store import SessionStore
from sessions.worker import metrics
from sessions.worker.celery_app import app, ensure_schema
from sessions.worker.envelopes import cut

log = logging.getLogger(__name__)

# The event models build their validators on first use (an agent that only records never
# needs them); the worker builds them here, at import in the process its pool forks from,
# so the pool processes share one copy instead of each building its own.
build_models()

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
#: ... up to this (kept far below the Redis visibility timeout, see sessions.worker.config).
RETRY_BACKOFF_MAX = 300.0
#: Retries of an unexpected error before the batch is dead-lettered instead.
UNEXPECTED_ERROR_RETRIES = 5
#: Longest a pool process waits before it rejects a message back to the queue, when Celery
#: could not publish its retry (the broker refused the publish).
REQUEUE_DELAY_MAX = 10.0

_store: SessionStore | None = None
_marks: ConfirmationMarks | None = None
_store_lock = threading.Lock()


def get_store() -> SessionStore:
    """The process's store, created from settings on first use (after any fork).

    A worker that started while the database was away migrates it here, once it answers;
    raises :class:`~sessions.errors.StoreUnusableError` if it cannot be used.
    """
    global _store
    with _store_lock:
        ensure_schema()
        if _store is None:
            _store = SessionStore.from_settings(get_settings())
        return _store


def confirmation_marks() -> ConfirmationMarks:
    """The process's marks of settled batches on a Redis broker (a no-op elsewhere)."""
    global _marks
    with _store_lock:
        if _marks is None:
            _marks = ConfirmationMarks(get_settings())
        return _marks


def reset_store_after_fork() -> None:
    """Forget the parent's database pool and Redis client without closing their connections
    (they are the parent's)."""
    global _store
    if _store is not None:
        _store.engine.dispose(close=False)
    _store = None
    if _marks is not None:
        _marks.after_fork()


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: doubling, capped, with full jitter."""
    ceiling = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * 2**retries)
    return random.uniform(ceiling / 2, ceiling)


@app.task(name="sessions.ingest", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def ingest(self: Task, batch: Any) -> dict[str, int]:
    """Apply one batch of events exactly once; its invalid events are dead-lettered.

    A database outage retries the same message (same ``batch_id``) with exponential backoff,
    forever; a payload that can never be applied is dead-lettered with its reason. A batch
    that can be neither applied nor dead-lettered (the database refuses both writes) is
    retried with the same capped backoff until one of them works: it is never acknowledged.
    """
    batch_id = peek_batch_id(batch)
    try:
        return _ingest(self, batch, batch_id)
    except (Retry, Reject):
        raise
    except Exception as exc:
        why = "neither applied nor set aside, back on the queue"
        raise _retry(self, batch_id, exc, why, logging.ERROR) from exc


def _ingest(task: Task, batch: Any, batch_id: str | None) -> dict[str, int]:
    try:
        if task.request.delivery_info and task.request.delivery_info.get("redelivered"):
            poison = _poison_reason(task.request.id)
            if poison:
                return _dead_letter(task, batch, poison, "poison")
        started = time.perf_counter()
        result = get_store().apply(batch)
        seconds = time.perf_counter() - started
    except OUTAGE_ERRORS as exc:
        raise _retry(task, batch_id, exc, "database unavailable") from exc
    except PERMANENT_ERRORS as exc:
        return _dead_letter(task, batch, f"cannot be applied: {first_line(exc)}", "cannot_apply")
    except Exception as exc:
        if task.request.retries >= UNEXPECTED_ERROR_RETRIES:
            return _dead_letter(
                task,
                batch,
                f"failed {task.request.retries + 1} times: {first_line(exc)}",
                "unexpected_error",
            )
        log.exception("batch %s: unexpected error; will retry", batch_id)
        raise retry_later(task, exc, backoff(task.request.retries)) from exc
    # Committed: the agent may stop waiting (a crash before this line leaves the message
    # unacknowledged; its redelivery is a duplicate, which marks it then).
    confirmation_marks().mark(claimed_batch_uuid(batch))
    metrics.record_apply(result, seconds)
    log.info(
        "batch %s: %d events applied, %d duplicate, %d dead-lettered",
        batch_id,
        result.applied,
        result.duplicate,
        result.rejected,
    )
    return {"applied": result.applied, "duplicate": result.duplicate, "rejected": result.rejected}


def _retry(
    task: Task, batch_id: str | None, exc: Exception, why: str, level: int = logging.WARNING
) -> Retry | Reject:
    """:func:`retry_later` after the next backoff, saying so in the log at ``level``."""
    countdown = backoff(task.request.retries)
    log.log(
        level,
        "batch %s: %s (%s); retry %d in %.1f s",
        batch_id,
        why,
        first_line(exc),
        task.request.retries + 1,
        countdown,
    )
    return retry_later(task, exc, countdown)


def retry_later(task: Task, exc: Exception, countdown: float) -> Retry | Reject:
    """What to raise so that the message comes back in ``countdown`` seconds, never lost.

    Celery's retry publishes a copy of the message (with its retry count and an ETA)
    before the worker acknowledges this one. If that publish fails, Celery raises
    ``Reject(requeue=False)``, which drops the message: instead, wait a bounded time
    (:data:`REQUEUE_DELAY_MAX` at most) and reject it back to its queue.
    """
    from sessions.worker import config

    try:
        # On RabbitMQ the copy waits for the broker's confirm, at most AMQP_CONFIRM_TIMEOUT:
        # a broker blocking publishers (a memory or disk alarm) must not hang the pool process.
        retry: Retry = task.retry(
            exc=exc,
            countdown=countdown,
            throw=False,
            confirm_timeout=config.AMQP_CONFIRM_TIMEOUT,
        )
        return retry
    except Reject as refused:
        delay = min(countdown, REQUEUE_DELAY_MAX)
        log.error(
            "could not publish the retry of message %s (%s); rejecting it back to the queue "
            "in %.1f s",
            task.request.id,
            first_line(refused.reason) if isinstance(refused.reason, BaseException) else "",
            delay,
        )
        time.sleep(delay)  # bounded: the queue would hand it straight back
        return Reject(refused.reason, requeue=True)


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
    """Set ``batch`` aside with ``reason``, counted as ``kind``; retried if the database is away.

    Any other failure to write the dead letter is raised (and the message retried by
    :func:`ingest`).
    """
    try:
        get_store().dead_letter(batch, reason)
    except OUTAGE_ERRORS as exc:
        raise retry_later(task, exc, backoff(task.request.retries)) from exc
    confirmation_marks().mark(claimed_batch_uuid(batch))  # settled: the ledger claims its id
    metrics.record_dead_letter(kind)
    log.error("dead-lettered a batch: %s", reason)
    return {"applied": 0, "duplicate": 0, "rejected": 1}


@contextmanager
def _refusing(task: str) -> Iterator[None]:
    """Arguments out of bounds (sent by ``celery call`` or a beat entry) fail the sweep with
    one ERROR line naming them, before it changes anything; Celery reports the failure to the
    caller (the tasks declare them in ``throws``, so it logs no traceback for them)."""
    try:
        yield
    except REFUSED_ARGUMENTS as exc:
        log.error("%s refused its arguments, changed nothing: %s", task, exc)
        raise


#: What the reason of every dead letter written by :func:`set_aside` starts with. The task is
#: public (anyone who can publish to the queue can call it), so its reason is a claim of its
#: caller: normally the worker's envelope guard, which is what this says.
SET_ASIDE_PREFIX = "reported by the worker's envelope guard: "
#: Longest reason :func:`set_aside` keeps, in bytes of UTF-8 (the guard's are far shorter).
SET_ASIDE_REASON_BYTES = 2048


@app.task(name="sessions.set_aside", bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def set_aside(self: Task, text: Any, reason: Any) -> dict[str, int]:
    """Dead-letter a queue item that was no message (``sessions.worker.envelopes`` made this call).

    ``text`` is the item (cut to its first 64 KiB), ``reason`` what is wrong with it, both
    strings; it is stored as ``unreadable_message`` with the reason behind
    :data:`SET_ASIDE_PREFIX`. Arguments that are not strings are refused (logged at ERROR,
    nothing written, no retry). A database outage retries, for as long as it takes; any other
    failure is retried :data:`UNEXPECTED_ERROR_RETRIES` times, then the item is dropped
    (logged at ERROR): nothing escapes but a retry.
    """
    if not isinstance(text, str) or not isinstance(reason, str):
        log.error(
            "sessions.set_aside refused its arguments, wrote nothing: text and reason must be "
            "strings (got %s and %s)",
            type(text).__name__,
            type(reason).__name__,
        )
        return {"applied": 0, "duplicate": 0, "rejected": 0}
    claimed = f"{SET_ASIDE_PREFIX}{cut(reason, SET_ASIDE_REASON_BYTES)}"
    try:
        return _dead_letter(self, cut(text), claimed, "unreadable_message")
    except (Retry, Reject):
        raise
    except Exception as exc:
        if self.request.retries >= UNEXPECTED_ERROR_RETRIES:
            log.error(
                "an unreadable message could not be set aside in %d attempts, dropped (%s): %s",
                self.request.retries + 1,
                first_line(exc),
                claimed,
            )
            return {"applied": 0, "duplicate": 0, "rejected": 0}
        why = "an unreadable message could not be set aside, back on the queue"
        raise _retry(self, peek_batch_id(text), exc, why, logging.ERROR) from exc


@app.task(name="sessions.expire_idle", throws=REFUSED_ARGUMENTS)  # type: ignore[untyped-decorator]
def expire_idle(max_idle_seconds: float | None = None) -> list[str]:
    """End as ``expired`` every active session idle longer than ``max_idle_seconds`` (above 0
    and at most 100 years, like ``SESSIONS_MAX_IDLE_SECONDS``, the default)."""
    with _refusing("idle sweep"):
        result = get_store().expire_idle(max_idle_seconds)
    _log_sweep("idle sweep expired", result.changed)
    metrics.record_sweep(result, get_store().count_active)
    return list(result.changed)


@app.task(name="sessions.expire_older_than", throws=REFUSED_ARGUMENTS)  # type: ignore[untyped-decorator]
def expire_older_than(max_age_days: float | None = None) -> list[str]:
    """End as ``expired`` every active session created more than ``max_age_days`` ago (above
    0 and at most 36,525, like ``SESSIONS_MAX_AGE_DAYS``, the default)."""
    with _refusing("age sweep"):
        days = None if max_age_days is None else check_days("max_age_days", max_age_days)
        result = get_store().expire_older_than(None if days is None else timedelta(days=days))
    _log_sweep("age sweep expired", result.changed)
    metrics.record_sweep(result, get_store().count_active)
    return list(result.changed)


@app.task(name="sessions.sweep_health", throws=REFUSED_ARGUMENTS)  # type: ignore[untyped-decorator]
def sweep_health(
    warn_rate: float | None = None,
    fail_rate: float | None = None,
    min_requests: int | None = None,
) -> dict[str, list[str]]:
    """End as ``failed`` the sessions erring above ``fail_rate``; warn above ``warn_rate``
    (rates from 0 to 1, warn not above fail, ``min_requests`` at least 1: the settings')."""
    with _refusing("health sweep"):
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
