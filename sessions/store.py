"""The session store: exactly-once batch apply, sweeps, reads and direct lifecycle calls.

Synchronous, and unaware of Celery: workers, beat, the CLI and tests all call it the same
way. One :class:`SessionStore` owns one engine; after a fork call :meth:`dispose`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Engine, Row, Select, func, insert, select
from sqlalchemy.exc import DataError, DBAPIError, OperationalError

from sessions import checkpoints, latency_fold, messages, queries, sweeps
from sessions.apply import add_activity, apply_events
from sessions.batch_digest import content_digest, same_content
from sessions.bounds import (
    check_count,
    check_duration,
    check_id,
    check_limit,
    check_moment,
    check_rate,
    check_seconds,
)
from sessions.database import (
    READ_ONLY_OPTION,
    create_store_engine,
    upgrade_schema,
    upsert_into,
    upsert_into_table,
)
from sessions.decoding import DecodedBatch, DecodedEvent, RejectedEvent, read_batch
from sessions.errors import SessionLimitError, StoreUnavailableError, first_line
from sessions.events import Batch, CreateEvent
from sessions.plain import claimed_batch_uuid, peek_batch_id
from sessions.records import (
    Aggregate,
    ApplyResult,
    CheckpointRecord,
    DeadLetterReason,
    MessageRecord,
    MinuteActivity,
    PurgeResult,
    SessionRecord,
    SweepResult,
    UserAggregate,
    UserRanking,
    percentile_fields,
)
from sessions.rules import MAX_METADATA_DEPTH
from sessions.settings import Settings, get_settings, mask_url
from sessions.tables import (
    ERROR_RATE,
    AppliedBatch,
    DeadLetter,
    dead_letters_table,
    ledger_table,
    redeliveries_table,
    sessions_table,
)
from sessions.wire_records import WireRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Largest dead-lettered payload kept verbatim; longer ones are cut (and say so).
MAX_DEAD_LETTER_BYTES = 64 * 1024
#: PostgreSQL errors after which the whole transaction is simply run again: deadlock,
#: serialization failure, and a unique violation from two batches creating one session.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001", "23505"})
#: Attempts at one batch before a retryable error is raised to the caller.
MAX_ATTEMPTS = 5
#: A value the database refuses although the event model accepted it: out of range for its
#: column (PostgreSQL ``DataError``; SQLite's driver raises ``OverflowError``) or not storable
#: (a NUL character in JSON). It fails the same way on every attempt.
REFUSED_VALUES = (DataError, OverflowError)
#: Default page size of :meth:`SessionStore.list_sessions`.
DEFAULT_PAGE_SIZE = 100
#: Longest window :meth:`SessionStore.activity` reports, in minutes (a week).
MAX_ACTIVITY_MINUTES = 7 * 24 * 60
_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class _Arrival:
    """A batch as it arrived (``payload``, the caller's), decoded, and its content's digest."""

    payload: Any
    decoded: DecodedBatch
    digest: str | None


class SessionStore:
    """Reads and writes session metrics in a SQLAlchemy database (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, settings: Settings | None = None, **engine_options: Any):
        self.url = url
        self.settings = settings or get_settings()
        self.engine: Engine = create_store_engine(url, **engine_options)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> SessionStore:
        settings = settings or get_settings()
        return cls(settings.database_url, settings=settings)

    def __repr__(self) -> str:
        return f"SessionStore({mask_url(self.url)!r})"

    def upgrade(self) -> None:
        """Create or migrate the schema to the newest revision."""
        upgrade_schema(self.url)

    def dispose(self) -> None:
        """Drop pooled connections (after a fork, or when done)."""
        self.engine.dispose()

    # -- writes ------------------------------------------------------------------------

    def apply(
        self, batch: Batch | Mapping[str, Any] | str | bytes, now: datetime | None = None
    ) -> ApplyResult:
        """Apply one batch exactly once, in one transaction.

        ``batch`` is a :class:`Batch`, its message (a dict) or the message's JSON text, as a
        worker takes it off the broker (:func:`~sessions.decoding.read_batch`). Invalid
        events are dead-lettered with their reason and the others applied. A batch whose id
        is in the ledger already changes nothing and is reported as ``duplicate``; if the
        ledger holds that id for other content (a reused batch id), the batch is set aside
        whole in ``dead_letters`` (``batch_id_reused``) and reported as ``reused``.
        """
        decoded = read_batch(batch, self.settings.store_max_batch_events)
        digest = None if decoded.batch_id is None else content_digest(decoded)
        arrival = _Arrival(batch, decoded, digest)
        now = now or datetime.now(UTC)
        try:
            return self._transaction(lambda connection: self._apply(connection, arrival, now))
        except REFUSED_VALUES as exc:
            if decoded.batch_id is None or not decoded.events:
                raise
            # An event passed validation but holds a value the database refuses (an integer
            # beyond BIGINT, a NUL character in JSON): set that event aside, not the batch.
            log.warning(
                "batch %s: the database refused a value (%s); applying its events one by one",
                decoded.batch_id,
                first_line(exc),
            )
            return self._transaction(lambda connection: self._apply_each(connection, arrival, now))

    def _apply(self, connection: Connection, arrival: _Arrival, now: datetime) -> ApplyResult:
        decoded = arrival.decoded
        if decoded.batch_id is None:
            self._dead_letter(connection, None, decoded.rejected, now)
            self._settle(connection, arrival.payload, now)  # e.g. too many events, good id
            return ApplyResult(
                rejected=len(decoded.rejected),
                rejected_by_reason=_by_reason(malformed_batch=len(decoded.rejected)),
            )
        known = self._claim_or_compare(connection, arrival, now)
        if known is not None:
            return known
        self._dead_letter(connection, decoded.batch_id, decoded.rejected, now)
        apply_events(connection, decoded.events, self.settings.conversation_max_messages)
        add_activity(connection, decoded.events)
        return ApplyResult(
            applied=len(decoded.events),
            rejected=len(decoded.rejected),
            claimed=True,
            rejected_by_reason=_by_reason(invalid_event=len(decoded.rejected)),
            oldest_event_at=min((event.at for event in decoded.events), default=None),
        )

    def _apply_each(self, connection: Connection, arrival: _Arrival, now: datetime) -> ApplyResult:
        """``_apply`` one event at a time, each in a savepoint; refused events are dead-lettered."""
        decoded = arrival.decoded
        assert decoded.batch_id is not None
        known = self._claim_or_compare(connection, arrival, now)
        if known is not None:
            return known
        refused: list[RejectedEvent] = []
        applied: list[DecodedEvent] = []
        for event in decoded.events:
            try:
                with connection.begin_nested():
                    apply_events(connection, (event,), self.settings.conversation_max_messages)
                applied.append(event)
            except REFUSED_VALUES as exc:
                reason = f"{event.kind} of {event.session_id}: refused by the database: "
                refused.append(
                    RejectedEvent(
                        payload=(
                            event.to_payload()
                            if isinstance(event, WireRecord)
                            else event.model_dump(mode="json")
                        ),
                        reason=reason + first_line(getattr(exc, "orig", None) or exc),
                    )
                )
        self._dead_letter(connection, decoded.batch_id, [*decoded.rejected, *refused], now)
        add_activity(connection, applied)
        return ApplyResult(
            applied=len(decoded.events) - len(refused),
            rejected=len(decoded.rejected) + len(refused),
            claimed=True,
            rejected_by_reason=_by_reason(
                invalid_event=len(decoded.rejected), refused_by_database=len(refused)
            ),
            oldest_event_at=min((event.at for event in applied), default=None),
        )

    def _claim(
        self,
        connection: Connection,
        batch_id: uuid.UUID,
        now: datetime,
        digest: str | None = None,
    ) -> bool:
        """Insert ``batch_id`` (with the content's ``digest``) into the ledger; ``False`` if
        some transaction already did."""
        statement = (
            upsert_into(connection, ledger_table)
            .values(batch_id=batch_id, applied_at=now, content_digest=digest)
            .on_conflict_do_nothing(index_elements=["batch_id"])
            .returning(AppliedBatch.batch_id)
        )
        return connection.execute(statement).first() is not None

    def _claim_or_compare(
        self, connection: Connection, arrival: _Arrival, now: datetime
    ) -> ApplyResult | None:
        """Claim the arrival's batch id for its content (``None``: go on and apply it), or say
        what the batch is to a ledger that has the id: a duplicate, or a reused batch id.

        A duplicate (the ledger's digest is this content's, or there is none to compare)
        changes nothing. Other content under a claimed id is set aside whole in
        ``dead_letters`` (``batch_id_reused``) and not applied: the first batch under the
        id counted, and applying this one could count a legitimate retry twice if the
        digests ever disagreed about it.
        """
        decoded, digest = arrival.decoded, arrival.digest
        assert decoded.batch_id is not None
        if self._claim(connection, decoded.batch_id, now, digest):
            return None
        stored = connection.execute(
            select(ledger_table.c.content_digest).where(ledger_table.c.batch_id == decoded.batch_id)
        ).scalar_one_or_none()
        events = len(decoded.events) + len(decoded.rejected)
        if same_content(stored, digest):
            return ApplyResult(duplicate=events)
        reason = (
            f"batch_id_reused: batch {decoded.batch_id} was applied before with other content "
            f"(digest {stored}); these {events} events (digest {digest}) are set aside, "
            "not applied"
        )
        log.warning("batch %s: %s", decoded.batch_id, reason)
        payload = arrival.payload
        wire = payload.to_message() if isinstance(payload, Batch) else payload
        rejected = [RejectedEvent(payload=wire, reason=reason)]
        self._dead_letter(connection, decoded.batch_id, rejected, now, quiet=True)
        return ApplyResult(rejected=1, reused=True, rejected_by_reason={"batch_id_reused": 1})

    def _dead_letter(
        self,
        connection: Connection,
        batch_id: uuid.UUID | str | None,
        rejected: Sequence[RejectedEvent],
        now: datetime,
        *,
        quiet: bool = False,
    ) -> None:
        """Write ``rejected`` to ``dead_letters``, each logged unless ``quiet`` (the caller
        logs)."""
        if not rejected:
            return
        for item in rejected if not quiet else ():
            log.warning("dead-lettered an event of batch %s: %s", batch_id, item.reason)
        connection.execute(
            insert(dead_letters_table),
            [
                {
                    "batch_id": str(batch_id) if batch_id else None,
                    "payload": _payload_text(item.payload),
                    "reason": _storable(item.reason),
                    "received_at": now,
                }
                for item in rejected
            ],
        )

    def dead_letter(self, payload: Any, reason: str) -> None:
        """Set aside a whole payload that cannot be applied (the worker's poison messages).

        The ``batch_id`` it claims is kept in its own column, so it can be found by id, and
        is claimed in the ledger: the batch is settled, so a client waiting for it
        (``flush(wait=True)``, its republishing) stops waiting, and a copy of it is dropped as
        a duplicate instead of being set aside again.
        """
        rejected = [RejectedEvent(payload=payload, reason=reason)]
        claimed = peek_batch_id(payload)
        batch_id = claimed[:64] if claimed else None
        now = datetime.now(UTC)

        def set_aside(connection: Connection) -> None:
            self._dead_letter(connection, batch_id, rejected, now)
            self._settle(connection, payload, now)

        self._transaction(set_aside)

    def _settle(self, connection: Connection, payload: Any, now: datetime) -> None:
        """Claim in the ledger the batch id a payload set aside whole says it has, if any,
        with the payload's digest: other content under that id later is a reused id."""
        claimed = claimed_batch_uuid(payload)
        if claimed is not None:
            decoded = read_batch(payload, self.settings.store_max_batch_events)
            self._claim(connection, claimed, now, content_digest(decoded))

    def count_redelivery(self, message_id: str, now: datetime | None = None) -> int:
        """Note that ``message_id`` came back unfinished once more; how often it has, in all.

        Committed at once, before the message is worked on: if handling it kills the worker
        again, the count survives, and after ``max_redeliveries`` the worker sets it aside.
        """
        moment = now or datetime.now(UTC)
        upsert = upsert_into_table(redeliveries_table, self.engine.dialect.name).values(
            message_id=message_id, redeliveries=1, last_redelivered_at=moment
        )
        statement = upsert.on_conflict_do_update(
            index_elements=["message_id"],
            set_={
                "redeliveries": redeliveries_table.c.redeliveries + 1,
                "last_redelivered_at": upsert.excluded.last_redelivered_at,
            },
        ).returning(redeliveries_table.c.redeliveries)
        return self._transaction(lambda c: int(c.execute(statement).scalar_one()))

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest dead-lettered payloads, newest first (``limit``: 1 to 10,000)."""
        check_limit("limit", limit)
        with self._reading() as connection:
            rows = connection.execute(
                select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
            ).all()
        return [DeadLetter(**row._asdict()) for row in rows]

    def _transaction(self, work: Callable[[Connection], T], *, commit: bool = True) -> T:
        """Run ``work`` in one transaction, again after a deadlock-like conflict.

        With ``commit=False`` the transaction is rolled back: a dry run that reports exactly
        what the statements would change.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self.engine.connect() as connection, connection.begin() as transaction:
                    result = work(connection)
                    if not commit:
                        transaction.rollback()
                    return result
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate in RETRYABLE_SQLSTATES and attempt < MAX_ATTEMPTS:
                    log.info("retrying a transaction after %s (attempt %d)", sqlstate, attempt)
                    time.sleep(0.01 * attempt)
                    continue
                if isinstance(exc, OperationalError) and exc.connection_invalidated:
                    raise StoreUnavailableError(
                        f"lost the database at {mask_url(self.url)}: {exc.orig}"
                    ) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- sweeps --------------------------------------------------------------------------

    def expire_idle(
        self,
        max_idle_seconds: float | None = None,
        now: datetime | None = None,
        *,
        session_id: str | None = None,
        dry_run: bool = False,
    ) -> SweepResult:
        """Expire sessions idle (by event time) longer than ``max_idle_seconds``.

        :param max_idle_seconds: above 0 and at most 100 years; ``SESSIONS_MAX_IDLE_SECONDS``
            by default.
        :param now: the sweep's clock, timezone-aware; the wall clock by default.
        :param session_id: sweep only this session (the guide's pool replacing an idle one).
        :raises ValueError: an argument is out of bounds (``TypeError``: of the wrong type),
            before the database is asked anything.
        """
        idle = self.settings.max_idle_seconds if max_idle_seconds is None else max_idle_seconds
        check_seconds("max_idle_seconds", idle)
        _check_now(now)
        if session_id is not None:
            check_id("session_id", session_id)
        return self._transaction(
            lambda c: sweeps.expire_idle(c, idle, now or datetime.now(UTC), session_id=session_id),
            commit=not dry_run,
        )

    def expire_older_than(
        self,
        max_age: timedelta | None = None,
        now: datetime | None = None,
        *,
        dry_run: bool = False,
    ) -> SweepResult:
        """Expire active sessions created longer than ``max_age`` ago.

        :param max_age: above 0 and at most 100 years; ``SESSIONS_MAX_AGE_DAYS`` by default.
        :param now: the sweep's clock, timezone-aware; the wall clock by default.
        :raises ValueError: an argument is out of bounds (``TypeError``: of the wrong type).
        """
        age = self.settings.max_age if max_age is None else max_age
        check_duration("max_age", age)
        _check_now(now)
        return self._transaction(
            lambda c: sweeps.expire_older_than(c, age, now or datetime.now(UTC)),
            commit=not dry_run,
        )

    def sweep_health(
        self,
        warn_rate: float | None = None,
        fail_rate: float | None = None,
        min_requests: int | None = None,
        *,
        dry_run: bool = False,
    ) -> SweepResult:
        """End sessions above the fail error rate; report those above the warn rate.

        Each threshold defaults to its setting (``SESSIONS_HEALTH_*``) and has its bounds:
        rates from 0 to 1, the warn rate not above the fail rate, at least one request.

        :raises ValueError: a threshold is out of bounds (``TypeError``: not a number).
        """
        s = self.settings
        warn = s.health_warn_rate if warn_rate is None else warn_rate
        fail = s.health_fail_rate if fail_rate is None else fail_rate
        minimum = s.health_min_requests if min_requests is None else min_requests
        sweeps.check_health_thresholds(warn, fail, minimum)
        return self._transaction(
            lambda c: sweeps.sweep_health(c, warn, fail, minimum), commit=not dry_run
        )

    def purge(
        self,
        ended_before: datetime | None = None,
        ledger_before: datetime | None = None,
        dead_letters_before: datetime | None = None,
    ) -> PurgeResult:
        """Delete what ended before ``ended_before`` (default: ``SESSIONS_ENDED_RETENTION_DAYS``
        ago), ledger rows applied before ``ledger_before`` (``SESSIONS_LEDGER_RETENTION_DAYS``)
        and, if given, dead letters received before ``dead_letters_before``.

        :raises ValueError: a moment naive or out of bounds (``TypeError``: not a datetime).
        """
        for name, moment in (
            ("ended_before", ended_before),
            ("ledger_before", ledger_before),
            ("dead_letters_before", dead_letters_before),
        ):
            if moment is not None:
                check_moment(name, moment)
        now = datetime.now(UTC)
        return self._transaction(
            lambda c: sweeps.purge(
                c,
                ended_before or now - self.settings.ended_retention,
                ledger_before or now - self.settings.ledger_retention,
                dead_letters_before,
            )
        )

    # -- reads ---------------------------------------------------------------------------

    def applied_batch_ids(self, batch_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The ones of ``batch_ids`` in the ledger, i.e. applied (for read-your-writes)."""
        wanted = list(batch_ids)
        if not wanted:
            return set()
        with self._reading() as connection:
            found = connection.execute(
                select(ledger_table.c.batch_id).where(ledger_table.c.batch_id.in_(wanted))
            ).scalars()
            return set(found)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection whose statements read one snapshot, so that a read made of several
        (a page and its percentiles, totals and their histogram) agrees with itself.

        SQLite's transactions always do; PostgreSQL's do at ``REPEATABLE READ``. On SQLite the
        read begins a plain deferred transaction (:data:`~sessions.database.READ_ONLY_OPTION`),
        not the ``BEGIN IMMEDIATE`` of writes: in WAL mode a reader then never waits for, nor
        holds up, a worker's write.
        """
        with self.engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execution_options(isolation_level="REPEATABLE READ")
            else:
                connection.execution_options(**{READ_ONLY_OPTION: True})
            yield connection

    def _records(self, query: Select[Any]) -> list[SessionRecord]:
        """The sessions ``query`` selects (whole rows), with the percentiles of their runs'
        histograms (the rows' ``latency``)."""
        with self._reading() as connection:
            rows = connection.execute(query).mappings().all()
        return [
            SessionRecord.model_validate({**row, **percentile_fields(row["latency"] or {})})
            for row in rows
        ]

    def get(self, session_id: str) -> SessionRecord | None:
        """The live run of ``session_id``; ``None`` for a session never heard of.

        :raises TypeError: ``session_id`` is not a ``str``.
        :raises ValueError: it breaks the id rule (1 to 255 printable ASCII characters).
        """
        check_id("session_id", session_id)
        found = self._records(
            select(sessions_table).where(sessions_table.c.session_id == session_id)
        )
        return found[0] if found else None

    def list_sessions(
        self,
        user_id: str | None = None,
        status: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
    ) -> list[SessionRecord]:
        """One page of sessions ordered by id; pass the last id as ``after`` for the next.

        :param limit: the page size, 1 to 10,000.
        :raises ValueError: an unknown ``status``, a ``limit`` out of bounds, or an id
            (``user_id``, ``after``) that breaks the id rule; ``TypeError`` for a wrong type.
        """
        where = queries.session_filter(user_id, status)
        check_limit("limit", limit)
        if after is not None:
            check_id("after", after)
        t = sessions_table.c
        query = select(sessions_table).where(*where).order_by(t.session_id).limit(limit)
        if after is not None:
            query = query.where(t.session_id > after)
        return self._records(query)

    def iter_sessions(
        self, user_id: str | None = None, status: str | None = None, page_size: int = 500
    ) -> Iterator[SessionRecord]:
        """Every matching session, fetched page by page (keyset, so pages never shift).

        Raises as :meth:`list_sessions` does (``page_size`` is its ``limit``), at the first
        ``next``.
        """
        after: str | None = None
        while True:
            page = self.list_sessions(user_id=user_id, status=status, limit=page_size, after=after)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].session_id

    def aggregate(
        self,
        user_id: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Aggregate:
        """Totals over the matching sessions (their live runs), computed by the database, and
        the percentiles of their merged histograms.

        ``since`` / ``until`` select sessions by last activity, ``since`` included.

        :raises ValueError: an unknown ``status``, an id that breaks the id rule, or a
            ``since`` / ``until`` naive or outside 1970-01-01 to 9999-12-31 (UTC).
        """
        where = queries.session_filter(user_id, status, since, until)
        with self._reading() as connection:
            totals = connection.execute(queries.totals(where)).one()
            histogram = {b: int(n) for b, n in connection.execute(queries.histograms(where))}
        return Aggregate(**totals._asdict(), **percentile_fields(histogram))

    def top_users(
        self,
        by: UserRanking = "requests",
        limit: int = 10,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UserAggregate]:
        """The ``limit`` users with the most requests, errors, cost or the highest p95
        processing time over their sessions' live runs, highest first, ties by user id.

        Sessions without a ``user_id`` are left out; ``since`` / ``until`` as in
        :meth:`aggregate`. On SQLite the ranking by p95 merges the users' histograms in
        Python (``sessions.latency_fold``), the same ranking as the SQL's, and faster there.

        :raises ValueError: an unknown ``by``, a ``limit`` outside 1 to 10,000, or a
            ``since`` / ``until`` as :meth:`aggregate` refuses it.
        """
        where = queries.session_filter(since=since, until=until)
        ranking = queries.rank_users(by, limit, where)
        with self._reading() as connection:
            latency: dict[Any, dict[int, int]] | None = None
            if by == "p95" and latency_fold.folds_in_python(connection):
                users, latency = _ranked_by_p95_in_python(connection, limit, where)
            else:
                users = list(connection.execute(ranking).scalars())
            if not users:
                return []
            theirs = [*where, sessions_table.c.user_id.in_(users)]
            totals = {
                row.user_id: row for row in connection.execute(queries.totals(theirs, by_user=True))
            }
            if latency is None:  # the ranking by p95 in Python merged them already
                latency = _by_key(connection.execute(queries.histograms(theirs, by_user=True)))
        return [
            UserAggregate(**totals[user]._asdict(), **percentile_fields(latency.get(user, {})))
            for user in users
        ]

    def activity(self, since: datetime, until: datetime | None = None) -> list[MinuteActivity]:
        """The fleet minute by minute (UTC, event time), from the minute of ``since`` until
        ``until`` (now by default): events, requests, errors, and the session runs active.

        Raises ``ValueError`` for a naive time or a window longer than
        :data:`MAX_ACTIVITY_MINUTES`.
        """
        first, until = _minute_window(since, until or datetime.now(UTC))
        with self._reading() as connection:
            counts = {
                row.minute: row
                for row in connection.execute(queries.activity_minutes(first, until))
            }
            starts = {
                minute: n for minute, n in connection.execute(queries.run_starts(first, until))
            }
            ends = {minute: n for minute, n in connection.execute(queries.run_ends(first, until))}
        return _activity_series(first, until, counts, starts, ends)

    def unhealthy(
        self, warn_rate: float | None = None, min_requests: int | None = None, limit: int = 100
    ) -> list[SessionRecord]:
        """Active sessions above the warn error rate, worst first (what the health sweep sees)."""
        s = self.settings
        rate = check_rate("warn_rate", s.health_warn_rate if warn_rate is None else warn_rate)
        minimum = s.health_min_requests if min_requests is None else min_requests
        check_count("min_requests", minimum)
        check_limit("limit", limit)
        t = sessions_table.c
        query = (
            select(sessions_table)
            .where(sweeps.error_rate_above(rate, minimum))
            .order_by(ERROR_RATE.desc(), t.session_id)
            .limit(limit)
        )
        return self._records(query)

    def conversation(self, session_id: str, limit: int = 50) -> list[MessageRecord]:
        """The newest ``limit`` messages of the session's live run, oldest first (in ``seq``
        order); empty for a session never heard of."""
        with self._reading() as connection:
            rows = connection.execute(messages.newest_of_live_run(session_id, limit)).mappings()
            found = [MessageRecord.model_validate(row) for row in rows]
        found.reverse()
        return found

    def store_checkpoint(
        self,
        thread_id: str,
        checkpoint_id: str,
        data: Any,
        metadata: dict[str, Any] | None = None,
    ) -> CheckpointRecord:
        """Store a checkpoint as its thread's newest version, committed when this returns.

        :raises pydantic.ValidationError: an id is not a valid id, or ``data`` / ``metadata``
            is not JSON-serializable, too large, or not storable (the field and rule named).
        """
        checkpoint = checkpoints.CheckpointInput(
            thread_id=thread_id, checkpoint_id=checkpoint_id, data=data, metadata=metadata
        )
        now = datetime.now(UTC)
        keep = self.settings.checkpoints_per_thread
        return self._transaction(
            lambda connection: checkpoints.store_checkpoint(connection, checkpoint, now, keep)
        )

    def get_checkpoint(
        self, thread_id: str, checkpoint_id: str | None = None
    ) -> CheckpointRecord | None:
        """The thread's checkpoint ``checkpoint_id``, or its latest when ``None``."""
        with self._reading() as connection:
            return checkpoints.get_checkpoint(connection, thread_id, checkpoint_id)

    def list_checkpoints(self, thread_id: str, limit: int = 10) -> list[CheckpointRecord]:
        """The thread's newest ``limit`` checkpoints, newest first."""
        with self._reading() as connection:
            return checkpoints.list_checkpoints(connection, thread_id, limit)

    def put_writes(
        self, thread_id: str, checkpoint_id: str, task_id: str, writes: Sequence[Any]
    ) -> None:
        """Store one task's intermediate writes towards a checkpoint.

        :raises pydantic.ValidationError: as :meth:`store_checkpoint`.
        """
        checked = checkpoints.WritesInput(
            thread_id=thread_id, checkpoint_id=checkpoint_id, task_id=task_id, writes=writes
        )
        now = datetime.now(UTC)
        self._transaction(lambda connection: checkpoints.put_writes(connection, checked, now))

    def get_writes(self, thread_id: str, checkpoint_id: str) -> list[tuple[Any, ...]]:
        """Every write put towards the checkpoint, by task id."""
        with self._reading() as connection:
            return checkpoints.get_writes(connection, thread_id, checkpoint_id)

    def count_active(self) -> int:
        t = sessions_table.c
        with self._reading() as connection:
            return int(
                connection.execute(
                    select(func.count()).select_from(sessions_table).where(t.status == "active")
                ).scalar_one()
            )

    # -- direct lifecycle ----------------------------------------------------------------

    def create_session(
        self,
        session_id: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_active: int | None = None,
    ) -> SessionRecord:
        """Create (or start a new run of) a session now, under an optional active-session cap.

        At the cap it first expires sessions idle for ``session_limit_idle_seconds`` (the
        guide's 15 minutes), then raises :class:`SessionLimitError` if still full.
        """
        limit = max_active if max_active is not None else self.settings.max_active_sessions
        if max_active is not None:
            check_count("max_active", max_active)
        existing = self.get(session_id)
        already_active = existing is not None and existing.status == "active"
        if limit is not None and not already_active:
            self.ensure_capacity(session_id, limit)
        event = CreateEvent(
            session_id=session_id, user_id=user_id, metadata=metadata, at=datetime.now(UTC)
        )
        self.apply(Batch(events=(event,)))
        record = self.get(session_id)
        assert record is not None
        return record

    def ensure_capacity(self, session_id: str, limit: int) -> None:
        """The active-session cap's rule, before ``session_id`` becomes active: at ``limit``
        active sessions, first expire those idle for ``session_limit_idle_seconds`` (the
        guide's 15 minutes), then refuse if still full.

        :raises SessionLimitError: ``limit`` sessions are still active (message names the
            limit and ``session_id``).
        """
        if self.count_active() < limit:
            return
        reclaimed = self.expire_idle(self.settings.session_limit_idle_seconds)
        log.info("session limit %d reached: expired %d idle sessions", limit, reclaimed.count)
        if self.count_active() >= limit:
            raise SessionLimitError(
                f"maximum of {limit} active sessions reached; cannot create {session_id!r}"
            )

    def get_or_create(
        self, session_id: str, user_id: str | None = None, max_idle_seconds: float | None = None
    ) -> SessionRecord:
        """The guide's pool: the live session if active and not idle-expired, else a new run."""
        idle = self.settings.max_idle_seconds if max_idle_seconds is None else max_idle_seconds
        record = self.get(session_id)
        if record is not None and not record.is_expired(idle):
            return record
        if record is not None and record.status == "active":
            self.expire_idle(idle, session_id=session_id)
        return self.create_session(session_id, user_id)


def _by_reason(
    *, invalid_event: int = 0, refused_by_database: int = 0, malformed_batch: int = 0
) -> dict[DeadLetterReason, int]:
    """``ApplyResult.rejected_by_reason`` for the store's own reasons, without the zeros."""
    counts: dict[DeadLetterReason, int] = {
        "invalid_event": invalid_event,
        "refused_by_database": refused_by_database,
        "malformed_batch": malformed_batch,
    }
    return {reason: n for reason, n in counts.items() if n}


def _check_now(now: datetime | None) -> None:
    if now is not None:
        check_moment("now", now)


def _ranked_by_p95_in_python(
    connection: Connection, limit: int, where: list[ColumnElement[bool]]
) -> tuple[list[str], dict[Any, dict[int, int]]]:
    """``queries.rank_users("p95", limit, where)``'s users, from every selected user's
    histograms merged in Python (``sessions.latency_fold``: SQLite's ``json_each`` and
    windows over every (user, bucket) are the slow part of the overview there), and those
    histograms (the ranked users' are the ones their aggregates report)."""
    t = sessions_table.c
    rows = connection.execute(
        latency_fold.latency_texts(t.user_id, [*where, t.user_id.is_not(None)])
    )
    histograms = latency_fold.fold(rows)
    return latency_fold.rank_by_percentile(histograms, queries.P95, limit), histograms


def _by_key(rows: Iterable[Sequence[Any]]) -> dict[Any, dict[int, int]]:
    """``(key, bucket, count)`` rows as one histogram per key."""
    histograms: dict[Any, dict[int, int]] = {}
    for key, bucket, count in rows:
        histograms.setdefault(key, {})[bucket] = int(count)
    return histograms


def _minute_window(since: datetime, until: datetime) -> tuple[datetime, datetime]:
    """``since`` rounded down to its minute (UTC), and ``until``; checked."""
    check_moment("since", since)
    check_moment("until", until)
    first = since.astimezone(UTC).replace(second=0, microsecond=0)
    if until - first > MAX_ACTIVITY_MINUTES * _MINUTE:
        raise ValueError(f"since, until: at most {MAX_ACTIVITY_MINUTES} minutes apart")
    return first, until


def _activity_series(
    first: datetime,
    until: datetime,
    counts: Mapping[datetime, Row[Any]],
    starts: Mapping[datetime, int],
    ends: Mapping[datetime, int],
) -> list[MinuteActivity]:
    """Every minute from ``first`` until ``until``, zero where nothing happened. The runs
    active in a minute are those started in it or before, less those ended before it."""
    series: list[MinuteActivity] = []
    active = 0
    minute = first
    while minute < until:
        active += starts.get(minute, 0)
        row = counts.get(minute)
        series.append(
            MinuteActivity(
                minute=minute,
                events=row.events if row else 0,
                requests=row.requests if row else 0,
                errors=row.errors if row else 0,
                active_sessions=active,
            )
        )
        active -= ends.get(minute, 0)
        minute += _MINUTE
    return series


#: Levels of a dead-lettered payload kept when it is too deep to serialise whole: a batch's
#: envelope, its event and metadata at the deepest the model accepts, and some more.
DEAD_LETTER_LEVELS = MAX_METADATA_DEPTH + 8


def _payload_text(payload: Any) -> str:
    try:
        text = json.dumps(payload, default=repr, ensure_ascii=False)
    except RecursionError:  # deeper than json goes (an event the model refused as too deep)
        text = json.dumps(_pruned(payload, DEAD_LETTER_LEVELS), default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(payload)
    encoded = _storable(text).encode("utf-8")
    if len(encoded) > MAX_DEAD_LETTER_BYTES:
        cut = encoded[:MAX_DEAD_LETTER_BYTES].decode("utf-8", "ignore")
        return f"{cut}... [cut at {MAX_DEAD_LETTER_BYTES} of {len(encoded)} bytes]"
    return encoded.decode("utf-8")


def _pruned(value: Any, levels: int) -> Any:
    """``value`` with the objects and arrays below ``levels`` replaced by a note saying so
    (recursion bounded by ``levels``: safe whatever the depth, even for a cycle)."""
    if not isinstance(value, dict | list | tuple):
        return value
    if levels <= 0:
        return f"[cut: nested deeper than {DEAD_LETTER_LEVELS} levels]"
    if isinstance(value, dict):
        return {key: _pruned(item, levels - 1) for key, item in value.items()}
    return [_pruned(item, levels - 1) for item in value]


def _storable(text: str) -> str:
    """``text`` as a database text column takes it: no NUL, no lone surrogate (escaped)."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
