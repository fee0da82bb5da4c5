"""The read statements behind the operators' views: totals, latency histograms, rankings of
users and per-minute activity. Each function builds one statement; the store runs them.

Histograms are merged in SQL (each live row's ``latency`` unfolded into its buckets, counts
summed per bucket) and percentiles estimated from the merged counts in Python: a few hundred
rows at most per group, whatever the number of sessions. Only live runs count, as in every
aggregate of the store.

A window (``since`` / ``until``) selects sessions by ``last_activity``, from ``since``
included to ``until`` excluded. Without a status filter it still names every status, so
that the ``(status, last_activity_minute)`` index serves it (one range of minutes per status,
the exact times checked on the rows it finds) instead of a scan of every session.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, get_args

from sqlalchemy import (
    ColumnElement,
    Double,
    Integer,
    Select,
    case,
    func,
    literal,
    or_,
    select,
    true,
    type_coerce,
    union_all,
)

from sessions.bounds import check_choice, check_id, check_limit, check_moment
from sessions.database import latency_buckets, minute_of
from sessions.records import COUNTERS, STATUSES, UserRanking
from sessions.tables import (
    ACTIVE,
    UTCDateTime,
    activity_table,
    minute_start,
    runs_table,
    sessions_table,
)

#: Every measure users can be ranked by.
RANKINGS = get_args(UserRanking)
#: The percentile ``rank_users(by="p95")`` ranks by.
P95 = 0.95
#: Each live run's histogram unfolded into its buckets: one row per (session, bucket).
LIVE_BUCKETS = latency_buckets(sessions_table.c.latency).table_valued("key", "value").alias("l")
#: The bucket and the count of a :data:`LIVE_BUCKETS` row (SQLite's key is text: cast it, so
#: that buckets sort as numbers).
BUCKET = LIVE_BUCKETS.c.key.cast(Integer).label("bucket")
COUNT = LIVE_BUCKETS.c.value
#: ``FROM sessions`` with every live run's buckets.
LIVE_LATENCY = sessions_table.join(LIVE_BUCKETS, true())


def session_filter(
    user_id: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[ColumnElement[bool]]:
    """Conditions on ``sessions`` selecting a user's, a status's and a window's sessions.

    :raises ValueError: a ``user_id`` that breaks the id rule, a ``status`` not in
        :data:`STATUSES`, a ``since`` / ``until`` naive or out of bounds
        (:func:`sessions.bounds.check_moment`); ``TypeError`` for an argument of the wrong type.
    """
    t = sessions_table.c
    where: list[ColumnElement[bool]] = []
    if user_id is not None:
        where.append(t.user_id == check_id("user_id", user_id))
    if status is not None:
        where.append(t.status == check_choice("status", status, STATUSES))
    elif since is not None or until is not None:
        where.append(t.status.in_(STATUSES))
    if since is not None:
        since = check_moment("since", since)
        where += [t.last_activity_minute >= minute_start(since), t.last_activity >= since]
    if until is not None:
        until = check_moment("until", until)
        where += [t.last_activity_minute < until, t.last_activity < until]
    return where


def totals(where: list[ColumnElement[bool]], *, by_user: bool = False) -> Select[Any]:
    """Sessions and counter sums (0 over no session), in all or per user."""
    t = sessions_table.c
    query = select(
        *([t.user_id] if by_user else []),
        func.count().label("sessions"),
        *(func.coalesce(func.sum(t[name]), 0).label(name) for name in COUNTERS),
    ).where(*where)
    return query.group_by(t.user_id) if by_user else query


def histograms(where: list[ColumnElement[bool]], *, by_user: bool = False) -> Select[Any]:
    """The merged histogram of the selected sessions: ``([user_id,] bucket, count)`` rows."""
    group: list[Any] = [sessions_table.c.user_id] if by_user else []
    return (
        select(*group, BUCKET, func.sum(COUNT).label("count"))
        .select_from(LIVE_LATENCY)
        .where(*where)
        .group_by(*group, BUCKET)
    )


def rank_users(by: UserRanking, limit: int, where: list[ColumnElement[bool]]) -> Select[str]:
    """The ids of the ``limit`` users highest by ``by``, then by id; sessions without a user
    are nobody's and left out. Raises ``ValueError`` for an unknown ``by`` or a ``limit``
    outside 1 to :data:`~sessions.bounds.MAX_PAGE_SIZE`."""
    check_choice("by", by, RANKINGS)
    check_limit("limit", limit)
    t = sessions_table.c
    where = [*where, t.user_id.is_not(None)]
    if by == "p95":
        return _rank_by_percentile(P95, limit, where)
    measure = {"requests": t.request_count, "errors": t.error_count, "cost": t.cost}[by]
    return (
        select(t.user_id)
        .where(*where)
        .group_by(t.user_id)
        .order_by(func.sum(measure).desc(), t.user_id)
        .limit(limit)
    )


def _rank_by_percentile(
    fraction: float, limit: int, where: list[ColumnElement[bool]]
) -> Select[str]:
    """Users by the bucket holding their ``fraction`` percentile, highest first.

    That bucket is the first whose running count reaches the nearest rank
    ``ceil(fraction * total)``, i.e. ``fraction * total`` (the count is a whole number),
    multiplied in double precision as ``histogram.percentile`` does. Buckets are ordered as
    their estimates are, so ranking buckets ranks percentiles.
    """
    merged = histograms(where, by_user=True).subquery()
    running = select(
        merged.c.user_id,
        merged.c.bucket,
        func.sum(merged.c.count)
        .over(partition_by=merged.c.user_id, order_by=merged.c.bucket)
        .label("seen"),
        func.sum(merged.c.count).over(partition_by=merged.c.user_id).label("total"),
    ).subquery()
    return (
        select(running.c.user_id)
        .where(running.c.seen >= literal(fraction, Double) * running.c.total)
        .group_by(running.c.user_id)
        .order_by(func.min(running.c.bucket).desc(), running.c.user_id)
        .limit(limit)
    )


def activity_minutes(first: datetime, until: datetime) -> Select[Any]:
    """The stored per-minute counts from minute ``first`` until ``until``."""
    a = activity_table.c
    return select(a.minute, a.events, a.requests, a.errors).where(
        a.minute >= first, a.minute < until
    )


def run_starts(first: datetime, until: datetime) -> Select[datetime, int]:
    """Runs (live and archived) active at some time from minute ``first`` until ``until``,
    counted by the minute they became active in: ``first`` for those active before it.

    A run is active from its ``created_at`` to its ``ended_at``, or on while it has none.
    """
    s, r = sessions_table.c, runs_table.c
    live = select(s.created_at).where(
        s.created_at < until, or_(s.status == ACTIVE, s.ended_at >= first)
    )
    past = select(r.created_at).where(r.created_at < until, r.ended_at >= first)
    spans = union_all(live, past).subquery()
    start = type_coerce(
        case(
            (spans.c.created_at < first, literal(first, UTCDateTime())),
            else_=minute_of(spans.c.created_at),
        ),
        UTCDateTime(),
    ).label("minute")
    return select(start, func.count()).group_by(start)


def run_ends(first: datetime, until: datetime) -> Select[datetime, int]:
    """Runs that ended from minute ``first`` until ``until``, by the minute they ended in
    (their last active minute)."""
    ended = union_all(
        *(
            select(table.c.ended_at).where(table.c.ended_at >= first, table.c.ended_at < until)
            for table in (sessions_table, runs_table)
        )
    ).subquery()
    minute = minute_of(ended.c.ended_at).label("minute")
    return select(minute, func.count()).group_by(minute)
