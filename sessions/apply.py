"""Writing one batch of events into the session tables, inside the caller's transaction.

Counters are only ever changed additively in SQL (``x = x + :delta``): nothing is read in
Python and written back, so concurrent workers cannot lose each other's updates. The same
holds for each run's latency histogram (the run row's ``latency``: one more request in the
bucket of its processing time, merged in SQL by the statement that adds to the counters) and
for the per-minute activity (``activity_minutes``), written in the same transaction, so the
ledger that dedupes the counters dedupes them too.

Two paths, chosen per session:

* **Fast path** (nearly every session of nearly every batch): the batch only *records*
  requests for it. Its events are coalesced into one delta, and all such sessions are
  written by one ``INSERT .. ON CONFLICT DO UPDATE`` whose text never changes, histograms
  included (PostgreSQL: fed by ``unnest`` of one array per column; SQLite: one row's
  upsert run for every row by ``executemany``). The conflict branch only fires when the
  events belong to the live run (see below); sessions it leaves untouched fall through to
  the slow path.
* **Slow path**: the batch creates or ends the session, or records events older than its
  live run. The live row is locked (``SELECT .. FOR UPDATE``; SQLite's write transaction
  already excludes other writers), its run boundaries are read, and the events are walked in
  order. Only structure (status, run, created/ended times) is decided from what was read,
  under the lock; counters still move by deltas.

Runs: an explicit ``create`` of an *ended* session starts a new run (the guide's pool
re-creates expired sessions under the same id). The ended run is copied to
``session_runs`` (its histogram with it) and the live row restarts from zero. Event time
decides where an event belongs: an event older than the live run's ``created_at`` belongs to
an earlier run and is added there, so late and redelivered batches never end, restart or
inflate the wrong run.
"""

from __future__ import annotations

import functools
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy import update as sql_update

from sessions.database import latency_add, upsert_into_table
from sessions.decoding import RECORDS, DecodedEvent, Record
from sessions.events import CreateEvent, EndEvent, MessageEvent
from sessions.histogram import EDGES, HIGHEST, OVERFLOW
from sessions.messages import CHUNK, insert_messages, trim
from sessions.records import COUNTERS  # in the order deltas carry them
from sessions.tables import (
    ERROR_RATE_BOUND_MAX,
    ERROR_RATE_STEPS,
    JSONDocument,
    LatencyHistogram,
    UTCDateTime,
    activity_table,
    error_rate_bound,
    first_error_rate_bound,
    minute_start,
    runs_table,
    sessions_table,
)

#: Messages kept per run when the caller does not say (``SESSIONS_CONVERSATION_MAX_MESSAGES``).
DEFAULT_MAX_MESSAGES = 1000


@dataclass(slots=True)
class Delta:
    """What a run of events adds to one session: counters, time span, first known owner."""

    request_count: int = 0
    error_count: int = 0
    total_processing_time: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    first_at: datetime | None = None
    last_at: datetime | None = None
    user_id: str | None = None
    metadata: dict[str, Any] | None = None
    #: Requests per processing-time bucket: what the run's histogram gains.
    latency: dict[int, int] = field(default_factory=dict)

    def touch(self, at: datetime) -> None:
        if self.first_at is None or at < self.first_at:
            self.first_at = at
        if self.last_at is None or at > self.last_at:
            self.last_at = at

    def add(self, event: Record) -> None:
        # Every applied record runs this, so it is spelled out (no call of ``touch`` or
        # ``bucket_of``, fields read once, counters that an event leaves at zero not
        # rewritten): some 0.7 us less per event than the plain form, with the same sums,
        # added in the same order (float addition is not associative).
        seconds = event.processing_time
        self.total_processing_time += seconds
        if event.error:
            self.error_count += 1
        if event.input_tokens:
            self.input_tokens += event.input_tokens
        if event.output_tokens:
            self.output_tokens += event.output_tokens
        if event.cost:
            self.cost += event.cost
        # A time without a request (the guide's ``increment_requests=False``) is no sample:
        # a histogram holds as many samples as its run has requests.
        if event.counts_request:
            self.request_count += 1
            bucket = OVERFLOW if seconds >= HIGHEST else bisect_right(EDGES, seconds)
            latency = self.latency
            latency[bucket] = latency.get(bucket, 0) + 1
        at = event.at
        first_at = self.first_at
        if first_at is None:
            self.first_at = self.last_at = at
        elif at < first_at:
            self.first_at = at
        elif at > self.last_at:  # type: ignore[operator]  # set with first_at
            self.last_at = at
        if self.user_id is None:
            self.user_id = event.user_id

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COUNTERS}

    @property
    def empty(self) -> bool:
        return self.first_at is None


def group_by_session(events: Iterable[DecodedEvent]) -> dict[str, list[DecodedEvent]]:
    """Events per session id, each list in recorded order."""
    groups: dict[str, list[DecodedEvent]] = {}
    for event in events:
        groups.setdefault(event.session_id, []).append(event)
    return groups


def _later(column: Any, value: Any) -> ColumnElement[Any]:
    """``max(column, value)`` in portable SQL (``GREATEST`` is not SQLite)."""
    return case((value > column, value), else_=column)


def _additive_set(table: Any, source: Any) -> dict[str, Any]:
    """``SET`` clauses adding ``source``'s deltas to ``table`` and widening its time span."""
    return {
        **{name: table.c[name] + source[name] for name in COUNTERS},
        "last_activity": _later(table.c.last_activity, source["last_activity"]),
        **_indexed_activity_set(table, source),
        # Only the first run may move its start earlier: in later runs an older event
        # belongs to an earlier run and never reaches this statement.
        "created_at": case(
            (
                and_(table.c.run == 1, source["created_at"] < table.c.created_at),
                source["created_at"],
            ),
            else_=table.c.created_at,
        ),
        "user_id": func.coalesce(table.c.user_id, source["user_id"]),
        "latency": latency_add(table.c.latency, source["latency"]),
    }


def _indexed_activity_set(table: Any, source: Any) -> dict[str, Any]:
    """``SET`` clauses of the live row's coarse, indexed columns (``sessions`` only): the
    minute of its activity and the bound of its error rate, which change far less often than
    the values they follow (:mod:`sessions.tables`)."""
    if table is not sessions_table:
        return {}
    t = table.c
    return {
        "last_activity_minute": _later(t.last_activity_minute, source["last_activity_minute"]),
        "error_rate_bound": error_rate_bound(
            t.error_count + source["error_count"],
            t.request_count + source["request_count"],
            t.error_rate_bound,
        ),
    }


@functools.cache
def _adding_upsert(table: Table, dialect: str) -> Insert:
    """``INSERT`` into ``table``, or on its primary key add to every other column (``x + :x``)."""
    upsert = upsert_into_table(table, dialect)
    return upsert.on_conflict_do_update(
        index_elements=list(table.primary_key),
        set_={c.name: c + upsert.excluded[c.name] for c in table.columns if not c.primary_key},
    )


def upsert_records(connection: Connection, deltas: dict[str, Delta]) -> set[str]:
    """The fast path: write every records-only session in one statement, histogram included.

    Returns the ids it wrote; the others had events older than their live run and must
    take the slow path.
    """
    if not deltas:
        return set()
    if connection.dialect.name == "postgresql":
        return _upsert_records_postgresql(connection, deltas)
    return _upsert_records_sqlite(connection, deltas)


@functools.cache
def _live_row_upsert(dialect: str) -> Insert:
    """One session's fast-path upsert, for :func:`_upsert_records_sqlite`'s ``executemany``:
    insert the row a new live session would be, or add to the live run (never to a later run
    than the events' own)."""
    upsert = upsert_into_table(sessions_table, dialect)
    excluded = upsert.excluded
    return upsert.on_conflict_do_update(
        index_elements=[sessions_table.c.session_id],
        set_=_additive_set(sessions_table, excluded),
        where=or_(
            sessions_table.c.run == 1,
            sessions_table.c.created_at <= excluded.created_at,
        ),
    )


def _upsert_records_sqlite(connection: Connection, deltas: dict[str, Delta]) -> set[str]:
    """The fast path on SQLite: one single-row upsert, executed for every session at once.

    Its text never changes, so SQLAlchemy compiles it once and the driver runs it row by row
    in C (``executemany``). A multi-row ``VALUES`` is a new statement for every row count,
    compiled each time: two thirds of a batch's CPU on SQLite, some 65 us per event at
    batches of 2000 (README, Performance). No ``RETURNING``: with it SQLAlchemy would rebuild
    the multi-row form ("insertmanyvalues"); the row count says instead, as on PostgreSQL,
    whether any row was left alone.
    """
    rows = _new_live_rows(deltas)
    if connection.execute(_live_row_upsert("sqlite"), rows).rowcount == len(rows):
        return set(deltas)
    return set(deltas) - _left_alone(connection, deltas)


def _left_alone(connection: Connection, deltas: dict[str, Delta]) -> set[str]:
    """After a fast-path upsert wrote fewer rows than it was given: the sessions it left alone,
    those whose live run started after some of their events (the ``WHERE`` of
    :func:`_live_row_upsert`, read back: a row it wrote has ``run = 1``, or a start at or before
    its delta's first event, which the statement did not move)."""
    t = sessions_table.c
    ids = sorted(deltas)
    left: set[str] = set()
    for start in range(0, len(ids), CHUNK):  # bound parameters stay few on every backend
        later_runs = connection.execute(
            select(t.session_id, t.created_at).where(
                t.session_id.in_(ids[start : start + CHUNK]), t.run > 1
            )
        )
        left.update(
            session_id
            for session_id, created_at in later_runs
            if (first_at := deltas[session_id].first_at) is None or created_at > first_at
        )
    return left


def _new_live_rows(deltas: dict[str, Delta]) -> list[dict[str, Any]]:
    """The fast path's rows on SQLite (:func:`_live_row_upsert`'s ``executemany``): each
    session as a new live row would be."""
    return [
        {
            "session_id": session_id,
            "user_id": delta.user_id,
            "status": "active",
            "run": 1,
            "created_at": delta.first_at,
            "last_activity": delta.last_at,
            "last_activity_minute": minute_start(_known(delta.last_at)),
            "error_rate_bound": first_error_rate_bound(delta.error_count, delta.request_count),
            "latency": delta.latency or None,
            **delta.values(),
        }
        # Sorted so that concurrent batches lock shared rows in the same order.
        for session_id, delta in sorted(deltas.items())
    ]


#: The fast path on PostgreSQL: the same upsert as :func:`_live_row_upsert`, but fed
#: with one array per column through ``unnest``. Its text never changes, so SQLAlchemy
#: compiles it once and psycopg prepares it once, whatever the number of rows; the
#: multi-row ``VALUES`` form costs a compilation and a parse of thousands of placeholders
#: on every batch (measured: ~75% of the worker's time at 500-event batches). The rules
#: are :func:`_additive_set`'s, spelled in SQL; the store tests run both forms.
#:
#: Each array travels as one text parameter, an array literal made by :func:`_array_literal`
#: (psycopg adapts a list item by item in Python, some 5 us per row of a batch here). Times
#: travel as integer microseconds since the epoch (``n * interval '1 microsecond'`` is exact
#: below 2**53 us, some 285 years), and a column that is zero (or NULL) in every row travels
#: as an empty array: ``unnest`` pads it with NULLs, read back as 0 (or NULL). A histogram
#: delta travels as the text of its ``bigint[]`` pairs (:func:`_latency_literal`), merged by
#: ``session_latency_add`` (revision 0008) under the row lock the upsert holds anyway.
_PG_UPSERT = text(
    """
    INSERT INTO sessions AS s (session_id, user_id, status, run, created_at, last_activity,
                               last_activity_minute, error_rate_bound,
                               request_count, error_count, total_processing_time,
                               input_tokens, output_tokens, cost, latency)
    SELECT d.session_id, d.user_id, 'active', 1,
           TIMESTAMPTZ 'epoch' + d.created_us * INTERVAL '1 microsecond',
           TIMESTAMPTZ 'epoch' + d.last_us * INTERVAL '1 microsecond',
           date_trunc('minute', TIMESTAMPTZ 'epoch' + d.last_us * INTERVAL '1 microsecond', 'UTC'),
           CASE WHEN d.request_count > 0 AND d.error_count > 0
                THEN LEAST(16 * d.error_count / d.request_count + 2, 18) ELSE 0 END,
           coalesce(d.request_count, 0), coalesce(d.error_count, 0),
           coalesce(d.total_processing_time, 0), coalesce(d.input_tokens, 0),
           coalesce(d.output_tokens, 0), coalesce(d.cost, 0), CAST(d.latency AS bigint[])
      FROM unnest(CAST(:session_id AS varchar[]), CAST(:user_id AS varchar[]),
                  CAST(:created_us AS bigint[]), CAST(:last_us AS bigint[]),
                  CAST(:request_count AS bigint[]), CAST(:error_count AS bigint[]),
                  CAST(:total_processing_time AS float8[]), CAST(:input_tokens AS bigint[]),
                  CAST(:output_tokens AS bigint[]), CAST(:cost AS float8[]),
                  CAST(:latency AS text[]))
        AS d(session_id, user_id, created_us, last_us, request_count, error_count,
             total_processing_time, input_tokens, output_tokens, cost, latency)
    ON CONFLICT (session_id) DO UPDATE SET
        latency = session_latency_add(s.latency, excluded.latency),
        request_count = s.request_count + excluded.request_count,
        error_count = s.error_count + excluded.error_count,
        total_processing_time = s.total_processing_time + excluded.total_processing_time,
        input_tokens = s.input_tokens + excluded.input_tokens,
        output_tokens = s.output_tokens + excluded.output_tokens,
        cost = s.cost + excluded.cost,
        last_activity = CASE WHEN excluded.last_activity > s.last_activity
                             THEN excluded.last_activity ELSE s.last_activity END,
        last_activity_minute = CASE WHEN excluded.last_activity_minute > s.last_activity_minute
                                    THEN excluded.last_activity_minute
                                    ELSE s.last_activity_minute END,
        error_rate_bound = CASE
            WHEN s.request_count + excluded.request_count > 0
             AND (16 * (s.error_count + excluded.error_count)
                      > s.error_rate_bound * (s.request_count + excluded.request_count)
                  OR 16 * (s.error_count + excluded.error_count)
                      < (s.error_rate_bound - 3) * (s.request_count + excluded.request_count))
            THEN LEAST(16 * (s.error_count + excluded.error_count)
                       / (s.request_count + excluded.request_count) + 2, 18)
            ELSE s.error_rate_bound END,
        created_at = CASE WHEN s.run = 1 AND excluded.created_at < s.created_at
                          THEN excluded.created_at ELSE s.created_at END,
        user_id = coalesce(s.user_id, excluded.user_id)
    WHERE s.run = 1 OR s.created_at <= excluded.created_at
    """
)
#: The coarse columns' rules (:func:`sessions.tables.error_rate_bound` with its constants,
#: ``last_activity_minute`` the minute of ``last_activity``) are spelled in it as well.
assert (ERROR_RATE_STEPS, ERROR_RATE_BOUND_MAX) == (16, 18), "_PG_UPSERT spells them"
#: After :data:`_PG_UPSERT` wrote fewer rows than it was given: the ones it left alone (it
#: locked them all the same). Those had a later run than some of their events; a row it
#: wrote has ``run = 1`` or a start at or before its first event, so it is never listed.
_PG_SKIPPED = text(
    """
    SELECT d.session_id
      FROM unnest(CAST(:session_id AS varchar[]), CAST(:created_us AS bigint[]))
        AS d(session_id, created_us)
      JOIN sessions AS s ON s.session_id = d.session_id
     WHERE s.run > 1
       AND s.created_at > TIMESTAMPTZ 'epoch' + d.created_us * INTERVAL '1 microsecond'
    """
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MINUTE = timedelta(minutes=1)


def _upsert_records_postgresql(connection: Connection, deltas: dict[str, Delta]) -> set[str]:
    ordered = sorted(deltas)  # concurrent batches lock shared rows in the same order
    rows = [deltas[session_id] for session_id in ordered]
    columns: dict[str, list[Any]] = {
        "session_id": ordered,
        "user_id": [delta.user_id for delta in rows],
        "created_us": [_micros(delta.first_at) for delta in rows],
        "last_us": [_micros(delta.last_at) for delta in rows],
        **{name: [getattr(delta, name) for delta in rows] for name in COUNTERS},
        "latency": [_latency_literal(delta.latency) for delta in rows],
    }
    parameters = {name: _array_literal(values) for name, values in columns.items()}
    # The row count, not RETURNING: reading back hundreds of ids costs more than the rare
    # second query when some row was left alone.
    written = ordered
    if connection.execute(_PG_UPSERT, parameters).rowcount != len(ordered):
        skipped = set(
            connection.execute(
                _PG_SKIPPED,
                {"session_id": parameters["session_id"], "created_us": parameters["created_us"]},
            ).scalars()
        )
        written = [session_id for session_id in ordered if session_id not in skipped]
    return set(written)


#: ``"-(b + 1),"`` for each bucket ``b``: the first half of its pair in an array literal.
_BUCKET_SLOTS = tuple(f"{-bucket - 1}," for bucket in range(OVERFLOW + 1))


def _latency_literal(latency: dict[int, int]) -> str | None:
    """A delta's bucket counts as the text of the ``bigint[]`` pairs ``latency`` holds
    (:func:`sessions.tables.latency_pairs`, in the same order), made from each bucket's
    ready text: about half the cost of formatting every number, on every row of a batch."""
    if not latency:
        return None
    slots = _BUCKET_SLOTS
    return "{" + ",".join([slots[bucket] + str(count) for bucket, count in latency.items()]) + "}"


def _known(at: datetime | None) -> datetime:
    assert at is not None  # a delta in the fast path has seen at least one event
    return at


def _micros(at: datetime | None) -> int:
    return (_known(at) - _EPOCH) // _MICROSECOND


#: Characters that a string element of an array literal must have escaped.
_ARRAY_SPECIAL = re.compile(r'["\\]')


def _array_literal(values: list[Any]) -> str:
    """``values`` as a PostgreSQL array literal; ``{}`` when each is 0, ``None`` (or False).

    Elements are ints, floats (``repr`` round-trips exactly), ``None`` or strings, which are
    always quoted (and ``"``, ``\\`` escaped), so no content can end an element early.
    """
    if not any(values):
        return "{}"
    if None not in values:
        if not isinstance(values[0], str):
            return "{" + ",".join(map(repr, values)) + "}"
        if not _ARRAY_SPECIAL.search("".join(values)):
            return '{"' + '","'.join(values) + '"}'
    return "{" + ",".join(map(_array_element, values)) + "}"


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        if _ARRAY_SPECIAL.search(value):
            value = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{value}"'
    return repr(value)


@dataclass(slots=True)
class _LiveRun:
    """The structure of a session's live row, as read under its lock."""

    run: int
    status: str
    created_at: datetime
    ended_at: datetime | None


@dataclass(slots=True)
class SessionWalk:
    """The slow path for one session: its events applied in order against its locked row."""

    connection: Connection
    session_id: str
    live: _LiveRun | None = None
    pending: Delta = field(default_factory=Delta)

    def run(self, events: Sequence[DecodedEvent]) -> None:
        self.live = self._lock()
        for event in events:
            if self.live is None:
                self._insert_first(event)
            elif isinstance(event, RECORDS):
                self._record(event)
            elif isinstance(event, MessageEvent):
                if self._belongs_to_live(event.at):
                    self.pending.touch(event.at)  # activity; the message itself is stored apart
            elif isinstance(event, CreateEvent):
                self._create(event)
            else:
                self._end(event)
        self._flush()

    def _lock(self) -> _LiveRun | None:
        t = sessions_table.c
        row = self.connection.execute(
            select(t.run, t.status, t.created_at, t.ended_at)
            .where(t.session_id == self.session_id)
            .with_for_update()
        ).first()
        return None if row is None else _LiveRun(row.run, row.status, row.created_at, row.ended_at)

    def _belongs_to_live(self, at: datetime) -> bool:
        assert self.live is not None
        return self.live.run == 1 or at >= self.live.created_at

    def _insert_first(self, event: DecodedEvent) -> None:
        ended = isinstance(event, EndEvent)
        status = event.status if isinstance(event, EndEvent) else "active"
        self.connection.execute(
            insert(sessions_table).values(
                session_id=self.session_id,
                user_id=getattr(event, "user_id", None),
                status=status,
                end_reason="explicit" if ended else None,
                run=1,
                created_at=event.at,
                last_activity=event.at,
                last_activity_minute=minute_start(event.at),
                ended_at=event.at if ended else None,
                metadata=event.metadata if isinstance(event, CreateEvent) else None,
            )
        )
        self.live = _LiveRun(1, status, event.at, event.at if ended else None)
        if isinstance(event, RECORDS):
            self.pending.add(event)

    def _record(self, event: Record) -> None:
        if self._belongs_to_live(event.at):
            self.pending.add(event)
        else:
            self._add_to_earlier_run(event)

    def _create(self, event: CreateEvent) -> None:
        assert self.live is not None
        ended_at = self.live.ended_at
        if self.live.status != "active" and ended_at is not None and event.at >= ended_at:
            self._start_new_run(event)
        elif self._belongs_to_live(event.at):
            # The live run's own create, possibly arriving after its end (batches of one
            # session applied out of order): it still names the owner and metadata.
            self.pending.touch(event.at)
            self.pending.user_id = self.pending.user_id or event.user_id
            if self.pending.metadata is None:  # not `or`: {} is metadata too
                self.pending.metadata = event.metadata
        # Otherwise the create is older than the live run: an earlier run's, nothing to do.

    def _end(self, event: EndEvent) -> None:
        assert self.live is not None
        if not self._belongs_to_live(event.at):
            return  # an end older than the live run is for an earlier run, ended already
        # Activity of the live run even when it has ended, as a record after the end is:
        # otherwise last_activity would depend on which of two ends arrived first.
        self.pending.touch(event.at)
        if self.live.status != "active":
            return  # the first end wins
        t = sessions_table.c
        self.connection.execute(
            sql_update(sessions_table)
            .where(t.session_id == self.session_id)
            .values(status=event.status, end_reason="explicit", ended_at=event.at)
        )
        self.live.status = event.status
        self.live.ended_at = event.at

    def _start_new_run(self, event: CreateEvent) -> None:
        assert self.live is not None
        self._flush()
        columns = [c.name for c in runs_table.columns]
        self.connection.execute(
            insert(runs_table).from_select(
                columns,
                select(*(sessions_table.c[name] for name in columns)).where(
                    sessions_table.c.session_id == self.session_id
                ),
            )
        )
        self.connection.execute(
            sql_update(sessions_table)
            .where(sessions_table.c.session_id == self.session_id)
            .values(
                run=self.live.run + 1,
                status="active",
                end_reason=None,
                created_at=event.at,
                last_activity=event.at,
                last_activity_minute=minute_start(event.at),
                error_rate_bound=0,
                ended_at=None,
                user_id=func.coalesce(
                    bindparam("new_user", event.user_id), sessions_table.c.user_id
                ),
                metadata=event.metadata,
                latency=None,
                **dict.fromkeys(COUNTERS, 0),
            )
        )
        self.live = _LiveRun(self.live.run + 1, "active", event.at, None)

    def _add_to_earlier_run(self, event: Record) -> None:
        """Add a record older than the live run to the run that was live at its time."""
        delta = Delta()
        delta.add(event)
        r = runs_table.c
        older = runs_table.alias("older")
        run_at_event_time = func.coalesce(
            select(func.max(older.c.run))
            .where(older.c.session_id == self.session_id, older.c.created_at <= event.at)
            .scalar_subquery(),
            select(func.min(older.c.run))
            .where(older.c.session_id == self.session_id)
            .scalar_subquery(),
        )
        params = _delta_params(delta)
        run = self.connection.execute(
            sql_update(runs_table)
            .where(r.session_id == self.session_id, r.run == run_at_event_time)
            .values(
                {
                    **{name: r[name] + params[name] for name in COUNTERS},
                    "last_activity": _later(r.last_activity, params["last_activity"]),
                    "user_id": func.coalesce(r.user_id, params["user_id"]),
                    "latency": latency_add(r.latency, params["latency"]),
                }
            )
            .returning(r.run)
        ).scalar_one_or_none()
        if run is None:
            # The earlier run was purged already: count it in the live run, never drop it.
            self.pending.add(event)

    def _flush(self) -> None:
        delta = self.pending
        if delta.empty:
            return
        assert self.live is not None  # the first event inserted the row if there was none
        params = _delta_params(delta)
        self.connection.execute(
            sql_update(sessions_table)
            .where(sessions_table.c.session_id == self.session_id)
            .values(
                {
                    **_additive_set(sessions_table, params),
                    "metadata": func.coalesce(sessions_table.c.metadata, params["metadata"]),
                }
            )
        )
        self.pending = Delta()


def _delta_params(delta: Delta) -> dict[str, Any]:
    """Bound parameters for a delta, typed so dates and JSON convert per backend."""
    return {
        **{name: bindparam(None, value) for name, value in delta.values().items()},
        "created_at": bindparam(None, delta.first_at, type_=UTCDateTime()),
        "last_activity": bindparam(None, delta.last_at, type_=UTCDateTime()),
        "last_activity_minute": bindparam(
            None, minute_start(_known(delta.last_at)), type_=UTCDateTime()
        ),
        "user_id": bindparam(None, delta.user_id),
        "metadata": bindparam(None, delta.metadata, type_=JSONDocument),
        "latency": bindparam(None, delta.latency, type_=LatencyHistogram()),
    }


@dataclass(slots=True)
class MinuteCounts:
    """Events, requests and errors per minute of event time: what ``activity_minutes`` gains."""

    counts: dict[datetime, list[int]] = field(default_factory=dict)
    # The minute of the previous event. A batch's events nearly all share one, and comparing
    # with its bounds costs a fifth of rounding each time down.
    _start: datetime = _EPOCH
    _end: datetime = _EPOCH
    _current: list[int] = field(default_factory=list)

    def add(self, event: DecodedEvent) -> None:
        at = event.at
        if not self._start <= at < self._end:
            self._start = at.replace(second=0, microsecond=0)
            self._end = self._start + _MINUTE
            self._current = self.counts.setdefault(self._start, [0, 0, 0])
        current = self._current
        current[0] += 1
        if isinstance(event, RECORDS):
            current[1] += event.counts_request
            current[2] += event.error


def add_activity(connection: Connection, events: Iterable[DecodedEvent]) -> None:
    """Count applied ``events`` in ``activity_minutes``, by the minute of their time.

    Call it last in the transaction: every concurrent batch adds to the same few minutes,
    and a row lock taken last is held for the shortest time (until the commit), after every
    session lock the transaction needs, so it never waits for one while holding a minute.
    """
    minutes = MinuteCounts()
    for event in events:
        minutes.add(event)
    if minutes.counts:
        connection.execute(
            _adding_upsert(activity_table, connection.dialect.name),
            [
                {"minute": minute, "events": seen, "requests": requests, "errors": errors}
                # Sorted: concurrent batches lock shared minutes in the same order.
                for minute, (seen, requests, errors) in sorted(minutes.counts.items())
            ],
        )


def apply_events(
    connection: Connection,
    events: Sequence[DecodedEvent],
    max_messages: int = DEFAULT_MAX_MESSAGES,
) -> None:
    """Write ``events`` (already deduplicated and validated) to their sessions, their runs'
    histograms and conversations (each kept to its newest ``max_messages``), in the open
    transaction; :func:`add_activity` counts them after.

    A ``message`` is activity of its session, as a ``record`` without a request is: it
    creates an unknown session and moves ``last_activity``; the message itself goes to the
    conversation of the run live at its time.
    """
    # One pass: a delta per session for as long as it only records or speaks (nearly always).
    fast: dict[str, Delta] = {}
    slow: set[str] = set()
    messages: list[MessageEvent] = []
    for event in events:
        session_id = event.session_id
        if isinstance(event, RECORDS):
            if session_id not in slow:
                delta = fast.get(session_id)
                if delta is None:
                    delta = fast[session_id] = Delta()
                delta.add(event)
        elif isinstance(event, MessageEvent):
            messages.append(event)
            if session_id not in slow:
                fast.setdefault(session_id, Delta()).touch(event.at)
        else:
            slow.add(session_id)
            fast.pop(session_id, None)
    written = upsert_records(connection, fast)
    slow.update(session_id for session_id in fast if session_id not in written)
    if slow:
        groups = group_by_session(event for event in events if event.session_id in slow)
        for session_id in sorted(slow):
            SessionWalk(connection, session_id).run(groups[session_id])
    if messages:
        trim(connection, insert_messages(connection, messages), max_messages)
