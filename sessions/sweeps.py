"""The housekeeping statements: each sweep is one set-based statement over indexed columns.

Every sweep only touches ``active`` sessions and re-checks its condition in the same
statement that changes the row, so two schedulers running it at once end each session once:
the second statement finds the row no longer active (PostgreSQL re-evaluates the ``WHERE``
of a row another transaction changed; SQLite runs one writer at a time).

A swept session's ``ended_at`` is an *event* time, the moment the rule was broken
(``last_activity + max_idle``, ``created_at + max_age``, or the last activity the health
verdict saw), not the sweep's clock. So a ``create`` the guide's pool sends when it finds the
session expired starts a new run even if the sweep's statement reaches the row first.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, Table, delete, select, tuple_, update

from sessions.bounds import (
    ArgumentError,
    check_count,
    check_duration,
    check_id,
    check_moment,
    check_rate,
    check_seconds,
)
from sessions.checkpoints import purge_checkpoints
from sessions.database import add_seconds, planned_as_likely
from sessions.records import PurgeResult, SweepResult
from sessions.tables import (
    ACTIVE,
    ERROR_RATE,
    AppliedBatch,
    DeadLetter,
    activity_table,
    dead_letters_table,
    error_rate_bound_above,
    ledger_table,
    messages_table,
    redeliveries_table,
    runs_table,
    sessions_table,
)

#: Runs whose messages one ``DELETE`` of :func:`purge` removes (so bound parameters stay few).
PURGE_CHUNK = 500


def _end_active(
    connection: Connection,
    condition: ColumnElement[bool],
    status: str,
    reason: str,
    ended_at: ColumnElement[datetime],
) -> tuple[str, ...]:
    t = sessions_table.c
    statement = (
        update(sessions_table)
        .where(t.status == ACTIVE, condition)
        .values(status=status, end_reason=reason, ended_at=ended_at)
        .returning(t.session_id)
    )
    return tuple(sorted(connection.execute(statement).scalars()))


def expire_idle(
    connection: Connection,
    max_idle_seconds: float,
    now: datetime,
    session_id: str | None = None,
) -> SweepResult:
    """Expire active sessions without activity (by event time) for ``max_idle_seconds``.

    :raises ValueError: ``max_idle_seconds`` or ``now`` is out of bounds (:mod:`sessions.bounds`).
    """
    check_seconds("max_idle_seconds", max_idle_seconds)
    check_moment("now", now)
    t = sessions_table.c
    cutoff = now - timedelta(seconds=max_idle_seconds)
    # The minute is what the index holds; it is never later than the activity it rounds, so
    # every idle row passes it, and the exact test drops the few of the cutoff's own minute.
    condition = (t.last_activity_minute < cutoff) & (t.last_activity < cutoff)
    if session_id is not None:
        condition = condition & (t.session_id == check_id("session_id", session_id))
    expired_at = add_seconds(t.last_activity, max_idle_seconds)
    changed = _end_active(connection, condition, "expired", "idle", expired_at)
    return SweepResult(sweep="expire_idle", changed=changed)


def expire_older_than(connection: Connection, max_age: timedelta, now: datetime) -> SweepResult:
    """Expire active sessions created more than ``max_age`` ago (the guide's 7-day cleanup).

    :raises ValueError: ``max_age`` or ``now`` is out of bounds (:mod:`sessions.bounds`).
    """
    check_duration("max_age", max_age)
    check_moment("now", now)
    t = sessions_table.c
    expired_at = add_seconds(t.created_at, max_age.total_seconds())
    changed = _end_active(connection, t.created_at < now - max_age, "expired", "age", expired_at)
    return SweepResult(sweep="expire_older_than", changed=changed)


def error_rate_above(rate: float, min_requests: int) -> ColumnElement[bool]:
    """Active sessions with enough requests whose error rate exceeds ``rate`` (the guide's test).

    The index ``ix_sessions_active_error_rate_bound`` holds an upper bound of each active
    session's error rate, so the health sweep reads only the rows that may be unhealthy (those
    within a few sixteenths below ``rate`` too) instead of every active session, and the exact
    rate decides.
    """
    t = sessions_table.c
    return (
        # Likely, for SQLite's planner: read through the partial index (planned_as_likely).
        planned_as_likely(t.status == ACTIVE)
        & (t.error_rate_bound > error_rate_bound_above(rate))
        & (rate < ERROR_RATE)
        & (t.request_count >= min_requests)
    )


def check_health_thresholds(warn_rate: float, fail_rate: float, min_requests: int) -> None:
    """The health sweep's thresholds as the settings bound them: rates from 0 to 1, the warn
    rate not above the fail rate, at least one request. Raises ``ValueError`` naming the one
    out of bounds (``TypeError`` for a value that is not a number)."""
    check_rate("warn_rate", warn_rate)
    check_rate("fail_rate", fail_rate)
    check_count("min_requests", min_requests)
    if warn_rate > fail_rate:
        raise ArgumentError.of("warn_rate", f"must not exceed fail_rate ({fail_rate!r})", warn_rate)


def sweep_health(
    connection: Connection, warn_rate: float, fail_rate: float, min_requests: int
) -> SweepResult:
    """End active sessions above ``fail_rate`` as ``failed``; report those above ``warn_rate``.

    :raises ValueError: a threshold is out of bounds (:func:`check_health_thresholds`).
    """
    check_health_thresholds(warn_rate, fail_rate, min_requests)
    failed = _end_active(
        connection,
        error_rate_above(fail_rate, min_requests),
        "failed",
        "health",
        sessions_table.c.last_activity,
    )
    t = sessions_table.c
    warned = connection.execute(
        select(t.session_id).where(error_rate_above(warn_rate, min_requests)).order_by(t.session_id)
    ).scalars()
    return SweepResult(sweep="sweep_health", changed=failed, warned=tuple(warned))


def purge(
    connection: Connection,
    ended_before: datetime,
    ledger_before: datetime,
    dead_letters_before: datetime | None = None,
) -> PurgeResult:
    """Delete sessions and past runs that ended before ``ended_before``, with their latency
    histograms (in their rows) and conversations, the activity minutes and checkpoints before
    it too, and old ledger rows.

    Each run's row is deleted before its messages, the order in which ``apply`` locks them,
    so a purge and a late record for the same run wait for each other instead of deadlocking.
    """
    t, r = sessions_table.c, runs_table.c
    sessions = connection.execute(
        delete(sessions_table)
        .where(t.status != "active", t.ended_at < ended_before)
        .returning(t.session_id, t.run, t.latency)
    ).all()
    runs = connection.execute(
        delete(runs_table)
        .where(r.ended_at < ended_before)
        .returning(r.session_id, r.run, r.latency)
    ).all()
    purged = [(session_id, run) for session_id, run, _ in [*sessions, *runs]]
    latency = sum(len(histogram or ()) for *_, histogram in [*sessions, *runs])
    messages = _delete_by_run(connection, messages_table, purged)
    checkpoints = purge_checkpoints(connection, ended_before)
    minutes = connection.execute(
        delete(activity_table).where(activity_table.c.minute < ended_before)
    ).rowcount
    ledger = connection.execute(
        delete(ledger_table).where(AppliedBatch.applied_at < ledger_before)
    ).rowcount
    redeliveries = connection.execute(
        delete(redeliveries_table).where(redeliveries_table.c.last_redelivered_at < ledger_before)
    ).rowcount
    dead = 0
    if dead_letters_before is not None:
        dead = connection.execute(
            delete(dead_letters_table).where(DeadLetter.received_at < dead_letters_before)
        ).rowcount
    return PurgeResult(
        sessions=len(sessions),
        runs=len(runs),
        latency=latency,
        messages=messages,
        checkpoints=checkpoints,
        minutes=minutes,
        ledger=ledger,
        redeliveries=redeliveries,
        dead_letters=dead,
    )


def _delete_by_run(connection: Connection, table: Table, runs: Sequence[tuple[str, int]]) -> int:
    """Delete the rows of ``table`` (messages) of ``runs`` (session id, run)."""
    key = tuple_(table.c.session_id, table.c.run)
    deleted = 0
    for start in range(0, len(runs), PURGE_CHUNK):
        chunk = [tuple(run) for run in runs[start : start + PURGE_CHUNK]]
        deleted += connection.execute(delete(table).where(key.in_(chunk))).rowcount
    return deleted
