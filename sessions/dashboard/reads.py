"""What the dashboard reads, through a store whose database connections cannot write.

Most numbers come from :class:`~sessions.store.SessionStore` itself (``top_users``,
``activity``, ``unhealthy``, ``list``, ``get``, ``aggregate``), so the page shows exactly
what the CLI and the API report. Two reads are the dashboard's own: the health levels'
counts, which the store has no call for, and the sessions by status, which
``store.aggregate(status=...)`` gives one status at a time. Five of those cost five scans of
the latency histograms (measured on 100,000 sessions: 0.6 s each on SQLite), where one
statement grouped by status and bucket does in one; the numbers are the same, because
percentiles come from the same merged histograms through the same estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import case, func, select

from sessions import latency_fold
from sessions.queries import BUCKET, COUNT, LIVE_LATENCY
from sessions.records import COUNTERS, STATUSES, Aggregate, SessionRecord, Status, percentile_fields
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.sweeps import error_rate_above
from sessions.tables import sessions_table


def open_read_only_store(settings: Settings) -> SessionStore:
    """A store on ``settings.database_url`` whose every connection refuses writes."""
    return SessionStore(settings.database_url, settings=settings, read_only=True)


@dataclass(frozen=True)
class HealthCounts:
    """Active sessions the health sweep would warn about, and those it would end."""

    #: Error rate above the warn rate, at or below the fail rate.
    warn: int
    #: Error rate above the fail rate: the next health sweep ends them as ``failed``.
    fail: int


def health_counts(store: SessionStore) -> HealthCounts:
    """Count the active sessions at each health level, as the health sweep judges them."""
    s = store.settings
    above_warn = error_rate_above(s.health_warn_rate, s.health_min_requests)
    above_fail = error_rate_above(s.health_fail_rate, s.health_min_requests)
    query = select(
        func.count().label("above_warn"),
        func.coalesce(func.sum(case((above_fail, 1), else_=0)), 0),
    ).where(above_warn)
    with store.engine.connect() as connection:
        warned, failing = connection.execute(query).one()
    return HealthCounts(warn=int(warned) - int(failing), fail=int(failing))


def health_level(record: SessionRecord, settings: Settings) -> Literal["warn", "fail"] | None:
    """The level the health sweep puts ``record`` at: the same rule as its SQL, in Python."""
    if record.status != "active" or record.request_count < settings.health_min_requests:
        return None
    if record.error_rate > settings.health_fail_rate:
        return "fail"
    return "warn" if record.error_rate > settings.health_warn_rate else None


@dataclass(frozen=True)
class StatusBreakdown:
    """``store.aggregate(status=s)`` for every status ``s``, and ``store.aggregate()``."""

    by_status: Mapping[Status, Aggregate]
    total: Aggregate


def by_status(store: SessionStore) -> StatusBreakdown:
    """Every status's totals and percentiles, and all sessions': the totals from one grouped
    statement, the histograms from a second (buckets grouped by status and bucket) or, on
    SQLite, from the rows' texts merged in Python (``sessions.latency_fold``: the same counts
    about twice as fast as ``json_each`` there).

    Both read one snapshot (PostgreSQL: ``REPEATABLE READ``), so counters and histograms agree.
    """
    t = sessions_table.c
    totals = select(
        t.status,
        func.count().label("sessions"),
        *(func.coalesce(func.sum(t[name]), 0).label(name) for name in COUNTERS),
    ).group_by(t.status)
    with store.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execution_options(isolation_level="REPEATABLE READ")
        rows = {row.status: row._asdict() for row in connection.execute(totals)}
        histograms: dict[str, dict[int, int]] = {}
        if latency_fold.folds_in_python(connection):
            texts = connection.execute(latency_fold.latency_texts(t.status, []))
            histograms = latency_fold.fold(texts)
        else:
            buckets = (
                select(t.status, BUCKET, func.sum(COUNT))
                .select_from(LIVE_LATENCY)
                .group_by(t.status, BUCKET)
            )
            for status, bucket, count in connection.execute(buckets):
                histograms.setdefault(status, {})[int(bucket)] = int(count)
    empty: dict[str, Any] = {"sessions": 0, **dict.fromkeys(COUNTERS, 0)}
    counters = {status: {**empty, **rows.get(status, {})} for status in STATUSES}
    merged: dict[int, int] = {}
    for histogram in histograms.values():
        for bucket, count in histogram.items():
            merged[bucket] = merged.get(bucket, 0) + count
    return StatusBreakdown(
        by_status={
            status: Aggregate(
                **{k: v for k, v in counters[status].items() if k != "status"},
                **percentile_fields(histograms.get(status, {})),
            )
            for status in STATUSES
        },
        total=Aggregate(
            sessions=sum(c["sessions"] for c in counters.values()),
            **{name: sum(c[name] for c in counters.values()) for name in COUNTERS},
            **percentile_fields(merged),
        ),
    )
