"""The database schema, as SQLAlchemy 2 typed models. Alembic migrations are made from it.

Indexes follow the queries: the sweeps scan ``(status, last_activity_minute)`` and
``(status, created_at)``, per-user reads scan ``(user_id, status)``, purges scan
``ended_at`` and ``applied_at``; per-minute activity is read by ``minute``. A run's latency
histogram is a column of its own row (``latency``, :class:`LatencyHistogram`), written by the
same upsert as its counters.

Nearly every write to ``sessions`` is the additive update of a live row, once per session per
batch. No index covers a column that update changes on every event (``last_activity``, the
counters): the idle sweep's index holds ``last_activity`` rounded down to its minute and the
health sweep's a coarse upper bound of the error rate, both rewritten only when they move, and
the table leaves a third of each page free. So PostgreSQL can update the row in place (a HOT
update: no index entry written); measured in README, Performance.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Dialect,
    Double,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
    and_,
    case,
    func,
    literal_column,
    or_,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnClause, ColumnElement
from sqlalchemy.types import DateTime, TypeDecorator, TypeEngine

#: Longest session or user id (the events module enforces the same bound).
ID_LENGTH = 255
#: Longest ledger digest: ``<version>:`` and 64 hex digits, with room for a longer version.
DIGEST_LENGTH = 80


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    PostgreSQL keeps ``timestamptz``. SQLite has no time zones, so values are stored as
    naive UTC text (which also keeps them comparable as strings inside SQL) and come back
    aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class LatencyHistogram(TypeDecorator[dict[int, int]]):
    """A run's latency histogram (the buckets of ``sessions.histogram``), read and written as
    ``{bucket: count}``; SQL NULL for a run without samples (an empty dict is stored as NULL,
    and read back as ``None``).

    PostgreSQL keeps ``bigint[]`` of sparse pairs, ``{-(b + 1), count, ...}`` for each bucket
    ``b`` with a request: a bucket slot is negative and a count positive, so
    ``array_position`` finds a bucket without meeting a count, and the merge
    (``session_latency_add``, revision 0008) loops only over the delta's pairs. ``bigint``:
    a bucket of one run past 2**31 - 1 requests must not fail its batch. SQLite keeps a JSON
    object, ``{"b": count}``, merged with ``json_patch`` over ``json_each``.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(BigInteger()))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: dict[int, int] | None, dialect: Dialect) -> Any:
        if not value:
            return None
        if dialect.name == "postgresql":
            return latency_pairs(value)
        return json.dumps({str(bucket): count for bucket, count in value.items()})

    def process_result_value(self, value: Any, dialect: Dialect) -> dict[int, int] | None:
        if value is None:
            return None
        if isinstance(value, str):
            found = {int(bucket): int(count) for bucket, count in json.loads(value).items()}
        else:
            found = {
                -slot - 1: int(count) for slot, count in zip(value[::2], value[1::2], strict=True)
            }
        return found or None


def latency_pairs(histogram: dict[int, int]) -> list[int]:
    """``histogram`` (bucket -> count) as PostgreSQL's ``latency`` holds it: sparse pairs
    ``[-(b + 1), count, ...]``."""
    return [n for bucket, count in histogram.items() for n in (-bucket - 1, count)]


#: ``None`` is stored as SQL NULL (not JSON ``null``) so that ``COALESCE`` fills it.
JSONDocument = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
#: SQLite only autoincrements an ``INTEGER PRIMARY KEY``.
BigId = BigInteger().with_variant(Integer(), "sqlite")


#: Percent of each ``sessions`` page PostgreSQL fills on insert; the rest takes updated rows.
SESSIONS_FILLFACTOR = 70
#: The unit of ``sessions.error_rate_bound``: sixteenths of an error rate.
ERROR_RATE_STEPS = 16
#: The largest ``error_rate_bound`` kept: above every rate a sweep asks about (at most 1).
ERROR_RATE_BOUND_MAX = ERROR_RATE_STEPS + 2


def minute_start(at: datetime) -> datetime:
    """``at`` rounded down to the start of its minute, in UTC (``last_activity_minute``)."""
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def first_error_rate_bound(errors: int, requests: int) -> int:
    """``error_rate_bound`` of a new row with these counts: :func:`error_rate_bound` from 0."""
    if requests > 0 and errors > 0:
        return min(errors * ERROR_RATE_STEPS // requests + 2, ERROR_RATE_BOUND_MAX)
    return 0


class Base(DeclarativeBase):
    pass


class _SessionColumns:
    """The columns a session run has, live (``sessions``) or archived (``session_runs``)."""

    user_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    end_reason: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_activity: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    request_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_processing_time: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cost: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    session_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)
    #: The run's latency histogram, bucket -> requests (:class:`LatencyHistogram`). Counts
    #: only ever grow by deltas merged in SQL, under the same ledger as the counters, so the
    #: histogram is exact in the way they are; no raw sample is kept.
    latency: Mapped[dict[int, int] | None] = mapped_column(LatencyHistogram())


class SessionRow(_SessionColumns, Base):
    """The live row of a session: its current run."""

    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    #: Which run of this session id the row holds; earlier runs are in ``session_runs``.
    run: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: ``last_activity`` rounded down to the start of its minute (:func:`minute_start`): what
    #: the idle sweep's index holds, so that it changes once a minute, not on every event.
    last_activity_minute: Mapped[datetime] = mapped_column(UTCDateTime())
    #: An upper bound of the error rate in steps of ``1 / ERROR_RATE_STEPS`` (capped at
    #: :data:`ERROR_RATE_BOUND_MAX`): what the health sweep's index holds. It moves only when
    #: the rate leaves the band below it (:func:`error_rate_bound`), not on every request.
    error_rate_bound: Mapped[int] = mapped_column(SmallInteger, default=0, server_default="0")

    __table_args__ = (
        Index("ix_sessions_status_activity_minute", "status", "last_activity_minute"),
        Index("ix_sessions_status_created_at", "status", "created_at"),
        Index("ix_sessions_user_id_status", "user_id", "status"),
        Index("ix_sessions_ended_at", "ended_at"),
        # Room on each page for the new version of a row, so updates can stay HOT.
        {"postgresql_with": {"fillfactor": SESSIONS_FILLFACTOR}},
    )


class SessionRunRow(_SessionColumns, Base):
    """An ended run of a session id that was later created again (the guide's pooling)."""

    __tablename__ = "session_runs"

    session_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    run: Mapped[int] = mapped_column(Integer, primary_key=True)

    __table_args__ = (
        Index("ix_session_runs_ended_at", "ended_at"),
        Index("ix_session_runs_user_id", "user_id"),
    )


class ActivityMinute(Base):
    """Events, requests and errors of all sessions in one minute of event time (UTC).

    Additive like the counters; what the operators' per-minute chart reads.
    """

    __tablename__ = "activity_minutes"

    #: The minute's start: an event at 12:34:56 counts in 12:34:00.
    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)


class ConversationMessageRow(Base):
    """One message of a session run's conversation, as a ``message`` event brought it.

    Read by ``(session_id, run, seq)``: the conversation of a run in the order its producers
    gave it (``seq``, then ``message_id``), never the order batches happened to be applied in.
    ``message_id`` is the producer's. Kept per run up to ``SESSIONS_CONVERSATION_MAX_MESSAGES``
    (the oldest go first), and purged with the run.
    """

    __tablename__ = "conversation_messages"

    session_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    message_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    run: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    message_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)

    __table_args__ = (
        Index("ix_conversation_messages_run_seq", "session_id", "run", "seq", "message_id"),
    )


class CheckpointRow(Base):
    """One stored checkpoint of a thread (an agent's state, for ``ContextEngineAdapter``).

    ``version`` counts up per thread with every store, so the latest is the highest, however
    clocks compare; storing a ``checkpoint_id`` again replaces it under a new version.
    """

    __tablename__ = "checkpoints"

    thread_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    data: Mapped[Any] = mapped_column(JSONDocument, nullable=False)
    checkpoint_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)

    __table_args__ = (
        Index("ux_checkpoints_thread_checkpoint", "thread_id", "checkpoint_id", unique=True),
    )


class CheckpointWriteRow(Base):
    """The intermediate writes one task made towards a checkpoint (LangGraph's ``put_writes``)."""

    __tablename__ = "checkpoint_writes"

    thread_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    writes: Mapped[Any] = mapped_column(JSONDocument, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class AppliedBatch(Base):
    """The dedupe ledger: one row per batch ever applied (or set aside whole).

    ``content_digest`` is what the batch said (:mod:`sessions.batch_digest`), so that other
    events under the same id are told from a redelivery; ``None`` for rows claimed before
    revision 0006 and for content that could not be digested.
    """

    __tablename__ = "applied_batches"

    batch_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    content_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH), nullable=True)


class Redelivery(Base):
    """How often a message came back unfinished: a worker died handling it, or it timed out.

    Keyed by the message's id (Celery's task id, the same on every redelivery), so even a
    payload without a usable ``batch_id`` can be recognised as poison and set aside.
    """

    __tablename__ = "redeliveries"

    message_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    redeliveries: Mapped[int] = mapped_column(Integer)
    last_redelivered_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class DeadLetter(Base):
    """An event or payload that could not be applied, kept with the reason."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


#: ``status = 'active'`` with the constant inlined, so that partial indexes on active sessions
#: can be proven usable (a bound parameter cannot, on SQLite or in a generic plan).
ACTIVE: ColumnClause[str] = literal_column("'active'")
#: A session's error rate in SQL; NULL without requests (never a division by zero).
ERROR_RATE = sa.cast(SessionRow.error_count, Double) / sa.cast(
    func.nullif(SessionRow.request_count, literal_column("0")), Double
)


def error_rate_bound(errors: Any, requests: Any, bound: Any) -> ColumnElement[int]:
    """The new ``error_rate_bound`` of a row that now has ``errors`` and ``requests`` and had
    ``bound`` (SQL expressions), such that ``bound / ERROR_RATE_STEPS >= errors / requests``
    (up to a rate of 1) always holds.

    While the rate ``r`` stays within ``[(bound - 3) / 16, bound / 16]`` the bound is kept;
    once it leaves, it becomes ``floor(16 r) + 2``, which puts ``r`` in the middle of that band
    again: the rate must move by at least a sixteenth before the indexed value is rewritten.
    A row without requests keeps its bound (there is no rate). Integer arithmetic only, so
    both databases compute exactly the same value.
    """
    scaled = errors * ERROR_RATE_STEPS
    moved = and_(requests > 0, or_(scaled > bound * requests, scaled < (bound - 3) * requests))
    fresh = scaled // requests + 2
    capped = case((fresh > ERROR_RATE_BOUND_MAX, ERROR_RATE_BOUND_MAX), else_=fresh)
    return case((moved, capped), else_=bound)


def error_rate_bound_above(rate: float) -> int:
    """The largest bound a row whose error rate is above ``rate`` (0 to 1) cannot have: such a
    row's ``error_rate_bound`` is greater (``bound >= 16 r > 16 rate``, and bounds are whole)."""
    return math.floor(rate * ERROR_RATE_STEPS)


# The health sweep's scan: only active sessions, by the upper bound of their error rate.
Index(
    "ix_sessions_active_error_rate_bound",
    SessionRow.error_rate_bound,
    postgresql_where=SessionRow.status == ACTIVE,
    sqlite_where=SessionRow.status == ACTIVE,
)

#: The tables as Core objects, for the set-based statements of the store.
sessions_table = cast(Table, SessionRow.__table__)
runs_table = cast(Table, SessionRunRow.__table__)
ledger_table = cast(Table, AppliedBatch.__table__)
dead_letters_table = cast(Table, DeadLetter.__table__)
redeliveries_table = cast(Table, Redelivery.__table__)
activity_table = cast(Table, ActivityMinute.__table__)
messages_table = cast(Table, ConversationMessageRow.__table__)
checkpoints_table = cast(Table, CheckpointRow.__table__)
checkpoint_writes_table = cast(Table, CheckpointWriteRow.__table__)
