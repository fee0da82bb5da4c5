"""Writing one batch of events into the session tables, inside the caller's transaction.

Counters are only ever changed additively in SQL (``x = x + :delta``): nothing is read in
Python and written back, so concurrent workers cannot lose each other's updates.

Two paths, chosen per session:

* **Fast path** (nearly every session of nearly every batch): the batch only *records*
  requests for it. Its events are coalesced into one delta, and all such sessions are
  written by one multi-row ``INSERT .. ON CONFLICT DO UPDATE``. The conflict branch only
  fires when the events belong to the live run (see below); sessions it leaves untouched
  fall through to the slow path.
* **Slow path**: the batch creates or ends the session, or records events older than its
  live run. The live row is locked (``SELECT .. FOR UPDATE``; SQLite's write transaction
  already excludes other writers), its run boundaries are read, and the events are walked in
  order. Only structure (status, run, created/ended times) is decided from what was read,
  under the lock; counters still move by deltas.

Runs: an explicit ``create`` of an *ended* session starts a new run (the guide's pool
re-creates expired sessions under the same id). The ended run is copied to
``session_runs`` and the live row restarts from zero. Event time decides where an event
belongs: an event older than the live run's ``created_at`` belongs to an earlier run and is
added there, so late and redelivered batches never end, restart or inflate the wrong run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
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

from sessions.database import upsert_into
from sessions.events import CreateEvent, EndEvent, RecordEvent
from sessions.tables import JSONDocument, UTCDateTime, runs_table, sessions_table

Event = CreateEvent | RecordEvent | EndEvent

#: The additive counters, in the order deltas carry them.
COUNTERS = (
    "request_count",
    "error_count",
    "total_processing_time",
    "input_tokens",
    "output_tokens",
    "cost",
)


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

    def touch(self, at: datetime) -> None:
        if self.first_at is None or at < self.first_at:
            self.first_at = at
        if self.last_at is None or at > self.last_at:
            self.last_at = at

    def add(self, event: RecordEvent) -> None:
        self.request_count += event.counts_request
        self.error_count += event.error
        self.total_processing_time += event.processing_time
        self.input_tokens += event.input_tokens
        self.output_tokens += event.output_tokens
        self.cost += event.cost
        self.touch(event.at)
        if self.user_id is None:
            self.user_id = event.user_id

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COUNTERS}

    @property
    def empty(self) -> bool:
        return self.first_at is None


def group_by_session(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Events per session id, each list in recorded order."""
    groups: dict[str, list[Event]] = {}
    for event in events:
        groups.setdefault(event.session_id, []).append(event)
    return groups


def coalesce_records(events: Sequence[Event]) -> Delta | None:
    """One delta for a session's events if they are all ``record``s, else ``None``."""
    delta = Delta()
    for event in events:
        if not isinstance(event, RecordEvent):
            return None
        delta.add(event)
    return delta


def _later(column: Any, value: Any) -> ColumnElement[Any]:
    """``max(column, value)`` in portable SQL (``GREATEST`` is not SQLite)."""
    return case((value > column, value), else_=column)


def _additive_set(table: Any, source: Any) -> dict[str, Any]:
    """``SET`` clauses adding ``source``'s deltas to ``table`` and widening its time span."""
    return {
        **{name: table.c[name] + source[name] for name in COUNTERS},
        "last_activity": _later(table.c.last_activity, source["last_activity"]),
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
    }


def upsert_records(connection: Connection, deltas: dict[str, Delta]) -> set[str]:
    """The fast path: write every records-only session in one statement.

    Returns the ids it wrote; the others had events older than their live run and must
    take the slow path.
    """
    if not deltas:
        return set()
    if connection.dialect.name == "postgresql":
        return _upsert_records_postgresql(connection, deltas)
    rows = [
        {
            "session_id": session_id,
            "user_id": delta.user_id,
            "status": "active",
            "run": 1,
            "created_at": delta.first_at,
            "last_activity": delta.last_at,
            **delta.values(),
        }
        # Sorted so that concurrent batches lock shared rows in the same order.
        for session_id, delta in sorted(deltas.items())
    ]
    upsert = upsert_into(connection, sessions_table).values(rows)
    excluded = upsert.excluded
    statement = upsert.on_conflict_do_update(
        index_elements=[sessions_table.c.session_id],
        set_=_additive_set(sessions_table, excluded),
        where=or_(
            sessions_table.c.run == 1,
            sessions_table.c.created_at <= excluded.created_at,
        ),
    ).returning(sessions_table.c.session_id)
    return set(connection.execute(statement).scalars())


#: The fast path on PostgreSQL: the same upsert as :func:`upsert_records` builds, but fed
#: with one array per column through ``unnest``. Its text never changes, so SQLAlchemy
#: compiles it once and psycopg prepares it once, whatever the number of rows; the
#: multi-row ``VALUES`` form costs a compilation and a parse of thousands of placeholders
#: on every batch (measured: ~75% of the worker's time at 500-event batches). The rules
#: are :func:`_additive_set`'s, spelled in SQL; the store tests run both forms.
_PG_UPSERT = text(
    """
    INSERT INTO sessions AS s (session_id, user_id, status, run, created_at, last_activity,
                               request_count, error_count, total_processing_time,
                               input_tokens, output_tokens, cost)
    SELECT d.session_id, d.user_id, 'active', 1, d.created_at, d.last_activity,
           d.request_count, d.error_count, d.total_processing_time,
           d.input_tokens, d.output_tokens, d.cost
      FROM unnest(CAST(:session_id AS varchar[]), CAST(:user_id AS varchar[]),
                  CAST(:created_at AS timestamptz[]), CAST(:last_activity AS timestamptz[]),
                  CAST(:request_count AS bigint[]), CAST(:error_count AS bigint[]),
                  CAST(:total_processing_time AS float8[]), CAST(:input_tokens AS bigint[]),
                  CAST(:output_tokens AS bigint[]), CAST(:cost AS float8[]))
        AS d(session_id, user_id, created_at, last_activity, request_count, error_count,
             total_processing_time, input_tokens, output_tokens, cost)
    ON CONFLICT (session_id) DO UPDATE SET
        request_count = s.request_count + excluded.request_count,
        error_count = s.error_count + excluded.error_count,
        total_processing_time = s.total_processing_time + excluded.total_processing_time,
        input_tokens = s.input_tokens + excluded.input_tokens,
        output_tokens = s.output_tokens + excluded.output_tokens,
        cost = s.cost + excluded.cost,
        last_activity = CASE WHEN excluded.last_activity > s.last_activity
                             THEN excluded.last_activity ELSE s.last_activity END,
        created_at = CASE WHEN s.run = 1 AND excluded.created_at < s.created_at
                          THEN excluded.created_at ELSE s.created_at END,
        user_id = coalesce(s.user_id, excluded.user_id)
    WHERE s.run = 1 OR s.created_at <= excluded.created_at
    RETURNING s.session_id
    """
)


def _upsert_records_postgresql(connection: Connection, deltas: dict[str, Delta]) -> set[str]:
    ordered = sorted(deltas.items())  # concurrent batches lock shared rows in the same order
    deltas_in_order = [delta for _, delta in ordered]
    parameters: dict[str, list[Any]] = {
        "session_id": [session_id for session_id, _ in ordered],
        "user_id": [delta.user_id for delta in deltas_in_order],
        "created_at": [delta.first_at for delta in deltas_in_order],
        "last_activity": [delta.last_at for delta in deltas_in_order],
    }
    for name in COUNTERS:
        parameters[name] = [getattr(delta, name) for delta in deltas_in_order]
    return set(connection.execute(_PG_UPSERT, parameters).scalars())


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

    def run(self, events: Sequence[Event]) -> None:
        self.live = self._lock()
        for event in events:
            if self.live is None:
                self._insert_first(event)
            elif isinstance(event, RecordEvent):
                self._record(event)
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

    def _insert_first(self, event: Event) -> None:
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
                ended_at=event.at if ended else None,
                metadata=getattr(event, "metadata", None),
            )
        )
        self.live = _LiveRun(1, status, event.at, event.at if ended else None)
        if isinstance(event, RecordEvent):
            self.pending.add(event)

    def _record(self, event: RecordEvent) -> None:
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
                ended_at=None,
                user_id=func.coalesce(
                    bindparam("new_user", event.user_id), sessions_table.c.user_id
                ),
                metadata=event.metadata,
                **dict.fromkeys(COUNTERS, 0),
            )
        )
        self.live = _LiveRun(self.live.run + 1, "active", event.at, None)

    def _add_to_earlier_run(self, event: RecordEvent) -> None:
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
        result = self.connection.execute(
            sql_update(runs_table)
            .where(r.session_id == self.session_id, r.run == run_at_event_time)
            .values(
                {
                    **{name: r[name] + params[name] for name in COUNTERS},
                    "last_activity": _later(r.last_activity, params["last_activity"]),
                    "user_id": func.coalesce(r.user_id, params["user_id"]),
                }
            )
        )
        if result.rowcount == 0:
            # The earlier run was purged already: count it in the live run, never drop it.
            self.pending.add(event)

    def _flush(self) -> None:
        delta = self.pending
        if delta.empty:
            return
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
        "user_id": bindparam(None, delta.user_id),
        "metadata": bindparam(None, delta.metadata, type_=JSONDocument),
    }


def apply_events(connection: Connection, events: Sequence[Event]) -> None:
    """Write ``events`` (already deduplicated and validated) in the open transaction."""
    groups = group_by_session(events)
    fast: dict[str, Delta] = {}
    slow: list[str] = []
    for session_id, session_events in groups.items():
        delta = coalesce_records(session_events)
        if delta is None:
            slow.append(session_id)
        else:
            fast[session_id] = delta
    written = upsert_records(connection, fast)
    slow.extend(session_id for session_id in fast if session_id not in written)
    for session_id in sorted(slow):
        SessionWalk(connection, session_id).run(groups[session_id])
