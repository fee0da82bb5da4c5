"""The housekeeping statements: each sweep is one set-based statement over indexed columns.

Every sweep only touches ``active`` sessions and re-checks its condition in the same
statement that changes the row, so two schedulers running it at once end each session once:
the second statement finds the row no longer active (PostgreSQL re-evaluates the ``WHERE``
of a row another transaction changed; SQLite runs one writer at a time).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, delete, select, update

from sessions.records import PurgeResult, SweepResult
from sessions.tables import (
    AppliedBatch,
    DeadLetter,
    dead_letters_table,
    ledger_table,
    runs_table,
    sessions_table,
)


def _end_active(
    connection: Connection, condition: ColumnElement[bool], status: str, reason: str, now: datetime
) -> tuple[str, ...]:
    t = sessions_table.c
    statement = (
        update(sessions_table)
        .where(t.status == "active", condition)
        .values(status=status, end_reason=reason, ended_at=now)
        .returning(t.session_id)
    )
    return tuple(sorted(connection.execute(statement).scalars()))


def expire_idle(connection: Connection, max_idle_seconds: float, now: datetime) -> SweepResult:
    """Expire active sessions without activity (by event time) for ``max_idle_seconds``."""
    cutoff = now - timedelta(seconds=max_idle_seconds)
    changed = _end_active(
        connection, sessions_table.c.last_activity < cutoff, "expired", "idle", now
    )
    return SweepResult(sweep="expire_idle", changed=changed)


def expire_older_than(connection: Connection, max_age: timedelta, now: datetime) -> SweepResult:
    """Expire active sessions created more than ``max_age`` ago (the guide's 7-day cleanup)."""
    changed = _end_active(
        connection, sessions_table.c.created_at < now - max_age, "expired", "age", now
    )
    return SweepResult(sweep="expire_older_than", changed=changed)


def error_rate_above(rate: float, min_requests: int) -> ColumnElement[bool]:
    t = sessions_table.c
    # error_count / request_count > rate, without a division (and so without a zero divisor).
    return (t.request_count >= min_requests) & (t.error_count > t.request_count * rate)


def sweep_health(
    connection: Connection, warn_rate: float, fail_rate: float, min_requests: int, now: datetime
) -> SweepResult:
    """End active sessions above ``fail_rate`` as ``failed``; report those above ``warn_rate``."""
    failed = _end_active(
        connection, error_rate_above(fail_rate, min_requests), "failed", "health", now
    )
    t = sessions_table.c
    warned = connection.execute(
        select(t.session_id)
        .where(t.status == "active", error_rate_above(warn_rate, min_requests))
        .order_by(t.session_id)
    ).scalars()
    return SweepResult(sweep="sweep_health", changed=failed, warned=tuple(warned))


def purge(
    connection: Connection,
    ended_before: datetime,
    ledger_before: datetime,
    dead_letters_before: datetime | None = None,
) -> PurgeResult:
    """Delete sessions and past runs that ended before ``ended_before``, and old ledger rows."""
    t = sessions_table.c
    sessions = connection.execute(
        delete(sessions_table).where(t.status != "active", t.ended_at < ended_before)
    ).rowcount
    runs = connection.execute(
        delete(runs_table).where(runs_table.c.ended_at < ended_before)
    ).rowcount
    ledger = connection.execute(
        delete(ledger_table).where(AppliedBatch.applied_at < ledger_before)
    ).rowcount
    dead = 0
    if dead_letters_before is not None:
        dead = connection.execute(
            delete(dead_letters_table).where(DeadLetter.received_at < dead_letters_before)
        ).rowcount
    return PurgeResult(sessions=sessions, runs=runs, ledger=ledger, dead_letters=dead)
