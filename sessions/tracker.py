"""The agent-side client: recording costs microseconds, a background thread publishes.

:meth:`SessionTracker.record` validates one event and appends it to an in-memory buffer; it
does no I/O unless the buffer is full (a burst: see below). Plainly valid ``record`` arguments
are kept as a tuple of values, anything else as a model (:func:`sessions.events.plain_record`).
A daemon thread cuts the buffer into immutable batches (every ``flush_interval`` or as soon as
``max_batch_events`` are waiting) and publishes each as one Celery message, the batch's JSON
text made straight from the buffer. A batch keeps its ``batch_id`` through every attempt, so a
publish that timed out but did reach the broker is still applied once.

A broker that is down never reaches the agent: a batch gets :data:`PUBLISH_ATTEMPTS` quick
attempts, then it is written, whole and with its ``batch_id``, to the durable local spool
(:mod:`sessions.spool`) and handed to ``on_unsent``. While the broker stays down, further
batches go to the spool without trying, for a pause that doubles up to
:data:`MAX_BROKER_DOWN_PAUSE`. Once a publish succeeds again (or when a tracker starts and
finds batches of an earlier run), the spool is replayed oldest first, before newer batches.

A burst that outruns the publisher (a plain loop of ``record`` calls, which fills the buffer
in a fraction of a second, sooner still while the publisher is connecting) never costs events
while the spool has room: when the buffer is full, the recording thread cuts the oldest
:data:`SPILL_BATCHES` batches off it and writes them, whole and with their ``batch_id``, to the
spool in one transaction (the only I/O ``record`` ever does, and only then); the publisher
thread replays them like unsent batches, and ``close`` goes on replaying until the spool is
empty or its timeout is near (what is left stays for the next tracker). Only when the buffer
and the spool are both full is an event dropped, counted and logged at ERROR.

What cannot be serialised is never taken for a broker outage. The event model refuses every
value a JSON text cannot carry, so ``record``/``create``/``end`` raise for it; should an event
still fail (a hole in those rules), it alone is set aside (``stats.events_refused``, an ERROR,
and :class:`UnserializableBatchError` from ``flush(wait=True)``) and the rest of its batch goes
out; a spooled batch that can never be published is quarantined by the spool and the replay
goes on behind it.

A published batch is not forgotten yet: it waits in the :mod:`~sessions.outbox` until a second
thread sees its ``batch_id`` in the database's ledger, and is published again if it is still
missing ``confirm_timeout_seconds`` later (then after twice that, and so on) and the evidence
says lost rather than late (:mod:`sessions.outbox` explains which). A worker that dies
holding a message the broker no longer has (kombu's Redis transport pops before it records
the message as unacknowledged) costs a delay, not the events. Agents without read access to
the database turn this off with ``SESSIONS_CONFIRM_TIMEOUT_SECONDS=0``.

On SIGTERM (when the application has not installed a handler of its own) and at normal
interpreter exit the buffer is flushed, to the broker or to the spool, and batches still
unconfirmed after a short wait go to the spool too (if the ledger answered), for the next
process to publish again. A SIGKILL loses at
most what was recorded since the last cut (one flush interval, or one batch), plus any
published batch that a worker lost in the same moment.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar, cast

from pydantic_core import PydanticSerializationError
from sqlalchemy.exc import SQLAlchemyError

from sessions.database import missing_sqlite_file
from sessions.errors import (
    BrokerUnavailableError,
    FlushTimeoutError,
    StoreUnavailableError,
    UnserializableBatchError,
    first_line,
)
from sessions.events import (
    AnyEvent,
    Batch,
    CreateEvent,
    EndEvent,
    EndStatus,
    MessageEvent,
    RecordEvent,
    RecordFields,
    batch_json,
    plain_record,
    record_event,
    serialisable,
)
from sessions.outbox import Outbox, Unconfirmed
from sessions.publisher import CeleryPublisher, Publisher
from sessions.settings import Settings, get_settings, mask_url
from sessions.spool import BatchSpool, SpillItem
from sessions.store import SessionStore

log = logging.getLogger(__name__)

Event = AnyEvent
T = TypeVar("T")
#: Called with each batch that could not be published and the last error (the spool's seam).
UnsentHandler = Callable[[Batch, BaseException], None]

#: Attempts at publishing one batch before it is given up.
PUBLISH_ATTEMPTS = 3
#: Seconds to wait before the second and third attempt.
PUBLISH_RETRY_DELAYS = (0.1, 0.5)
#: After a batch is given up, later batches are set aside untried for this many seconds ...
BROKER_DOWN_PAUSE = 1.0
#: ... doubling with every batch given up in a row, up to this.
MAX_BROKER_DOWN_PAUSE = 30.0
#: The buffer holds at most this many batches' worth of events (a plainly valid ``record``
#: costs about 250 bytes while it waits: 12 MB at 500-event batches); beyond it, ``record``
#: spills the oldest to the spool.
MAX_BUFFERED_BATCHES = 100
#: Batches a full buffer spills at a time, in one spool transaction (each SQLite call gives up
#: the GIL, and getting it back from a busy thread takes a switch interval: fewer, bigger writes).
SPILL_BATCHES = 10
#: After the spool refused a spill (full, or failing), seconds ``record`` drops events at a full
#: buffer instead of trying the spool again for each one.
SPILL_REFUSED_PAUSE = 1.0
#: Published batches kept until the ledger confirms them; the oldest are forgotten beyond ...
MAX_UNCONFIRMED_BATCHES = 10_000
#: ... or beyond this many bytes of their wire text.
MAX_UNCONFIRMED_BYTES = 64 * 1024 * 1024
#: Seconds between the confirming thread's looks at the ledger ...
CONFIRM_POLL_INTERVAL = 1.0
#: ... for batches published at least this long ago (younger ones are rarely applied yet).
CONFIRM_MIN_AGE = 0.5
#: At close, seconds to wait for the last published batches to show in the ledger.
CLOSE_CONFIRM_WAIT = 2.0
#: Seconds a queue backlog, once seen, holds back republishing before the queue is asked again.
BACKLOG_RECHECK_INTERVAL = 5.0
#: Seconds between looks at the database's ledger in ``flush(wait=True)``.
FLUSH_POLL_INTERVAL = 0.05
#: Seconds ``close`` waits by default for the buffer (and the spool) to be published.
CLOSE_TIMEOUT = 10.0
#: Seconds before ``close``'s deadline at which the publisher thread stops replaying the spool.
CLOSE_REPLAY_MARGIN = 1.0
#: Batch ids per ledger query.
LEDGER_QUERY_CHUNK = 1000
#: Spooled batches replayed per turn of the background thread (new batches wait meanwhile).
REPLAY_CHUNK = 50
#: While the spool holds batches, the thread tries to replay at least this often (seconds).
REPLAY_INTERVAL = 1.0
#: Seconds a replaying tracker claims spooled batches for (other agents sharing the spool
#: leave them alone meanwhile); far longer than publishing :data:`REPLAY_CHUNK` batches takes.
REPLAY_CLAIM_SECONDS = 60.0
#: ``spool`` argument meaning "the spool the settings name".
DEFAULT_SPOOL: Any = object()


@dataclass(frozen=True)
class TrackerStats:
    """What a tracker has done so far, in events and batches."""

    #: Events accepted by ``record``/``create``/``end``.
    events_recorded: int = 0
    #: Events dropped without error: recorded after ``close``, or while the buffer was full
    #: and the spool could not take them (none, full, or failing; logged at ERROR). A spill
    #: the spool refused counts its events here although ``events_recorded`` has them.
    events_dropped: int = 0
    #: Events accepted and not yet sent (nor given up).
    events_pending: int = 0
    batches_sent: int = 0
    events_sent: int = 0
    #: Batches (and their events) not published when first tried: broker down or failing.
    batches_failed: int = 0
    events_failed: int = 0
    #: Of those, the ones kept in the spool for replay ...
    events_spooled: int = 0
    #: ... and the ones lost: no spool, or the spool was full (logged at ERROR each time).
    events_lost: int = 0
    #: Batches (and events) spilled to the spool because the buffer was full (a burst that
    #: outran the publisher); replayed from there by this tracker, or another one.
    batches_spilled: int = 0
    events_spilled: int = 0
    #: Spooled batches (and events) published later, by this tracker (spilled ones included).
    batches_replayed: int = 0
    events_replayed: int = 0
    #: Published batches not yet seen in the ledger.
    batches_unconfirmed: int = 0
    #: Batches published again because the ledger still lacked them after the confirm timeout.
    batches_republished: int = 0
    events_republished: int = 0
    #: Unconfirmed batches forgotten (published, never seen applied): beyond the outbox's
    #: bounds, or first published longer ago than the spool's maximum age.
    batches_unverified: int = 0
    #: Unconfirmed batches kept in the spool at close, for the next run to publish again.
    batches_spooled_unconfirmed: int = 0
    #: Events accepted that could not be serialised as JSON (which the event model rules out:
    #: a bug): set aside, logged at ERROR, neither published nor spooled; they cost no other
    #: event, and ``flush(wait=True)`` raises :class:`UnserializableBatchError` for them.
    events_refused: int = 0


class SessionTracker:
    """Records session events for the pipeline without ever blocking or failing the agent.

    ``settings`` name the broker and database (default: the environment);
    ``flush_interval`` (seconds, default ``settings.flush_interval_ms``) and
    ``max_batch_events`` (default ``settings.batch_max_events``) decide when a batch is cut.
    ``publisher`` replaces the Celery publisher (tests); ``store`` the database that
    ``flush(wait=True)`` watches; ``spool`` keeps unsent batches and those a full buffer
    spills (default: the one in ``settings.spool_dir``; ``None``: no spool, unsent batches
    are lost and a full buffer drops, both counted); ``max_buffered_events`` bounds the
    buffer (default :data:`MAX_BUFFERED_BATCHES` batches); ``on_unsent`` receives each batch
    that could not be sent when first tried.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        flush_interval: float | None = None,
        max_batch_events: int | None = None,
        publisher: Publisher | None = None,
        store: SessionStore | None = None,
        on_unsent: UnsentHandler | None = None,
        max_buffered_events: int | None = None,
        spool: BatchSpool | None = DEFAULT_SPOOL,
    ) -> None:
        self.settings = settings or get_settings()
        interval = (
            self.settings.flush_interval_ms / 1000 if flush_interval is None else flush_interval
        )
        if interval <= 0:
            raise ValueError(f"flush_interval: must be > 0 seconds (got {interval})")
        batch_size = (
            self.settings.batch_max_events if max_batch_events is None else max_batch_events
        )
        if batch_size <= 0:
            raise ValueError(f"max_batch_events: must be > 0 (got {batch_size})")
        self.flush_interval = interval
        self.max_batch_events = batch_size
        self.max_buffered_events = max_buffered_events or batch_size * MAX_BUFFERED_BATCHES
        self._owns_publisher = publisher is None
        self._publisher: Publisher = publisher or CeleryPublisher(self.settings)
        self._owns_store = store is None
        self._store = store
        self._on_unsent = on_unsent
        self._owns_spool = spool is DEFAULT_SPOOL
        self._spool: BatchSpool | None = open_spool(self.settings) if self._owns_spool else spool
        self._reset_state()
        _live_trackers.add(self)
        _install_sigterm_handler()
        self._start()

    def _reset_state(self) -> None:
        """Fresh buffer, counters and synchronisation (at start, and in a forked child)."""
        self._lock = threading.Lock()
        #: Signalled (under ``_lock``) whenever the publisher thread has handled more events.
        self._progress = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._buffer: list[Event | RecordFields] = []
        self._closed = False
        self._flush_requested = False
        self._dropped_warned = False
        #: Events appended so far; each event's position in this sequence is its ``seq``.
        self._appended = 0
        #: Events cut into batches so far (``seq`` up to which batches are cut).
        self._cut = 0
        #: Batches cut and not yet published, spilled or given up: ``seq`` of their last
        #: event -> their events, oldest first (the publisher and a spill handle them apart).
        self._in_flight: dict[int, int] = {}
        #: Events whose batch was published, spilled or given up so far.
        self._handled_events = 0
        #: Batches this tracker spilled, not yet seen applied: id -> ``seq`` of their last event
        #: (``flush(wait=True)`` waits for them, whoever replays them).
        self._spilled: dict[uuid.UUID, int] = {}
        self._batches_spilled = self._events_spilled = 0
        #: Until when a full buffer drops rather than spills (the spool refused a spill).
        self._spill_refused_until = 0.0
        #: ``time.monotonic()`` by which the closing publisher thread stops replaying the spool.
        self._close_deadline = 0.0
        #: Published batches not yet seen in the ledger, with their text for republishing.
        self._outbox = Outbox(
            self.settings.confirm_timeout_seconds,
            MAX_UNCONFIRMED_BATCHES,
            MAX_UNCONFIRMED_BYTES,
            max_age=self.settings.spool_max_age.total_seconds(),
        )
        #: Outbox entries the latest ledger check found missing (candidates to republish).
        self._missing: set[uuid.UUID] = set()
        self._ledger_failing = False
        self._stop_confirming = threading.Event()
        #: Batches given up and not yet reported by a ``flush(wait=True)``: (seq, events).
        self._failed: list[tuple[int, int]] = []
        #: Events set aside as unserialisable, not yet reported: (seq, events, why).
        self._refused: list[tuple[int, int, str]] = []
        self._events_refused = 0
        self._dropped = 0
        self._batches_sent = self._events_sent = 0
        self._batches_failed = self._events_failed = 0
        self._events_spooled = self._events_lost = 0
        self._batches_replayed = self._events_replayed = 0
        self._batches_republished = self._events_republished = 0
        self._batches_spooled_unconfirmed = 0
        #: Whether the ledger has answered a look yet; until a backlog's next look is due.
        self._ledger_answered = False
        self._backlog_known_until = 0.0
        self._unverified_warned = False
        #: Whether the spool may hold batches to replay (it may, at start: an earlier run's).
        self._spool_pending = self._spool is not None
        self._broker_down_until = 0.0
        self._broker_down_pause = BROKER_DOWN_PAUSE
        self._failing_since: int | None = None

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"sessions-tracker-{id(self):x}", daemon=True
        )
        self._thread.start()
        self._confirmer: threading.Thread | None = None
        if self._outbox.republishing:
            self._confirmer = threading.Thread(
                target=self._confirm_loop, name=f"sessions-confirm-{id(self):x}", daemon=True
            )
            self._confirmer.start()

    # -- recording (the agent's hot path: validate, append, return) ------------------------

    def record(
        self,
        session_id: str,
        processing_time: float = 0.0,
        error: bool = False,
        user_id: str | None = None,
        *,
        counts_request: bool = True,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost: float = 0.0,
        at: datetime | None = None,
    ) -> None:
        """Record one request served in ``session_id`` (auto-creating the session).

        Raises :class:`pydantic.ValidationError` (a ``ValueError``) naming the field when an
        argument is invalid; never raises for broker or database trouble.
        """
        # Plainly valid arguments (nearly always) are kept as they are; the rest go through
        # the model, which converts them or refuses them with the field and rule named.
        fields = (
            plain_record(
                session_id,
                processing_time,
                error,
                user_id,
                counts_request,
                input_tokens,
                output_tokens,
                cost,
            )
            if at is None
            else None
        )
        self._append(
            fields
            or RecordEvent(
                session_id=session_id,
                at=at or datetime.now(UTC),
                user_id=user_id,
                processing_time=processing_time,
                error=error,
                counts_request=counts_request,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost=cost,
            )
        )

    def create(
        self,
        session_id: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> None:
        """Start ``session_id`` (or a new run of it, if it has ended) with owner and metadata."""
        self._append(
            CreateEvent(
                session_id=session_id,
                at=at or datetime.now(UTC),
                user_id=user_id,
                metadata=metadata,
            )
        )

    def message(
        self,
        session_id: str,
        role: str,
        content: str,
        metadata: dict[str, Any] | None = None,
        *,
        seq: int,
        message_id: uuid.UUID | None = None,
        at: datetime | None = None,
    ) -> MessageEvent:
        """Record one message of ``session_id``'s conversation at place ``seq``; the event.

        Raises :class:`pydantic.ValidationError` naming the field for a bad role, content
        (too long, NUL, lone surrogates), metadata or ``seq``.
        """
        event = MessageEvent(
            session_id=session_id,
            at=at or datetime.now(UTC),
            message_id=message_id or uuid.uuid4(),
            seq=seq,
            role=role,
            content=content,
            metadata=metadata,
        )
        self._append(event)
        return event

    def end(
        self, session_id: str, status: str = "completed", *, at: datetime | None = None
    ) -> None:
        """End the current run of ``session_id`` as ``completed``, ``failed`` or ``expired``."""
        # Any other status fails the model's validation, naming the field.
        self._append(
            EndEvent(
                session_id=session_id, at=at or datetime.now(UTC), status=cast(EndStatus, status)
            )
        )

    def _append(self, event: Event | RecordFields) -> None:
        spill: list[tuple[uuid.UUID, tuple[Event | RecordFields, ...], int]] = []
        with self._lock:
            full = len(self._buffer) >= self.max_buffered_events
            if self._closed or (full and not self._may_spill()):
                self._dropped += 1
                warn, self._dropped_warned = not self._dropped_warned, True
            else:
                if full:  # a burst outran the publisher: the oldest batches go to the spool
                    spill = self._cut_for_spill()
                self._buffer.append(event)
                self._appended += 1
                if len(self._buffer) >= self.max_batch_events:
                    self._wake.set()
                warn = False
        if spill:
            self._spill(spill)
        elif warn and self._closed:
            log.warning(
                "session tracker dropped an event: it is closed (counted in stats.events_dropped)"
            )
        elif warn:
            log.error(
                "session tracker dropped an event: its buffer is full (%d events) and %s "
                "(counted in stats.events_dropped; logged once)",
                self.max_buffered_events,
                "it has no spool"
                if self._spool is None
                else f"the spool at {self._spool.path} refused the last spill",
            )

    def _may_spill(self) -> bool:
        """Whether a full buffer can spill now (call under ``_lock``)."""
        return self._spool is not None and (
            not self._spill_refused_until or time.monotonic() >= self._spill_refused_until
        )

    def _cut_head(self, events: int) -> tuple[tuple[Event | RecordFields, ...], int]:
        """Cut the oldest ``events`` (or all) off the buffer as one batch, noted in flight
        (call under ``_lock``); the batch and the ``seq`` of its last event."""
        if len(self._buffer) <= events:
            batch, self._buffer = self._buffer, []
        else:
            batch = self._buffer[:events]
            del self._buffer[:events]
        self._cut += len(batch)
        self._in_flight[self._cut] = len(batch)
        return tuple(batch), self._cut

    def _cut_for_spill(self) -> list[tuple[uuid.UUID, tuple[Event | RecordFields, ...], int]]:
        """Cut the oldest :data:`SPILL_BATCHES` batches off a full buffer, each with its id
        noted as spilled (call under ``_lock``)."""
        spill = []
        for _ in range(SPILL_BATCHES):
            if not self._buffer:
                break
            batch_id = uuid.uuid4()
            events, seq = self._cut_head(self.max_batch_events)
            self._spilled[batch_id] = seq
            spill.append((batch_id, events, seq))
        while len(self._spilled) > MAX_UNCONFIRMED_BATCHES:  # forgotten: not waited for
            del self._spilled[next(iter(self._spilled))]
        return spill

    def _spill(self, spill: list[tuple[uuid.UUID, tuple[Event | RecordFields, ...], int]]) -> None:
        """Write batches cut off a full buffer to the spool, on the recording thread.

        Only a full buffer gets here, so a burst that outruns the publisher is slowed down by
        the spool's write (measured in ``bench.ingest --burst``) instead of losing events.
        """
        assert self._spool is not None
        texts = [self._wire_text(batch_id, events, seq) for batch_id, events, seq in spill]
        items = [
            SpillItem(str(batch_id), text, len(events))
            for (batch_id, _, _), (text, events) in zip(spill, texts, strict=True)
            if text is not None
        ]
        kept = 0
        try:
            kept = self._spool.put_texts(items)
        except Exception:
            log.exception("could not spill %d batches to %s", len(spill), self._spool.path)
        refused = sum(item.events for item in items[kept:])
        with self._lock:
            index = 0  # of the batch in ``items``
            for (batch_id, _, seq), (text, events) in zip(spill, texts, strict=True):
                if text is not None and index < kept:
                    self._batches_spilled += 1
                    self._events_spilled += len(events)
                else:
                    self._spilled.pop(batch_id, None)
                    self._dropped += len(events)
                index += text is not None
                self._handled_batch(seq)
            if kept:
                self._spool_pending = True
            if refused:
                self._spill_refused_until = time.monotonic() + SPILL_REFUSED_PAUSE
        if kept:
            self._wake.set()  # the publisher replays them when it can
        if refused:
            log.error(
                "session tracker dropped %d events: its buffer is full (%d events) and the "
                "spool at %s did not take them (counted in stats.events_dropped)",
                refused,
                self.max_buffered_events,
                self._spool.path,
            )

    def _handled_batch(self, seq: int) -> None:
        """The batch ending at ``seq`` was published, spilled or given up (under ``_lock``)."""
        self._handled_events += self._in_flight.pop(seq)
        self._progress.notify_all()

    def _handled_through(self) -> int:
        """``seq`` up to which every event was handled (call under ``_lock``)."""
        for seq, events in self._in_flight.items():
            return seq - events  # the oldest batch still in flight starts after this
        return self._cut

    # -- flushing and closing ---------------------------------------------------------------

    def flush(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Publish everything buffered now, without waiting for the flush interval.

        With ``wait=False`` this only asks the background thread and returns at once. With
        ``wait=True`` it returns once every event recorded before the call is applied in the
        database, and raises :class:`BrokerUnavailableError` if some of them could not be
        published, :class:`UnserializableBatchError` if some could not be serialised (and were
        set aside: ``stats.events_refused``), or :class:`FlushTimeoutError` after ``timeout``
        seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._appended
            self._flush_requested = True
        self._wake.set()
        if wait:
            self._wait_published(target, deadline, timeout)
            self._wait_applied(target, deadline, timeout)

    def _wait_published(self, target: int, deadline: float, timeout: float) -> None:
        with self._lock:
            published = self._progress.wait_for(
                lambda: self._handled_through() >= target, max(0.0, deadline - time.monotonic())
            )
            if not published:
                raise FlushTimeoutError(
                    f"{target - self._handled_through()} events were still not published after "
                    f"{timeout:g} s (broker {mask_url(self.settings.broker_url)})"
                )
            failed = [item for item in self._failed if item[0] <= target]
            self._failed = [item for item in self._failed if item[0] > target]
            refused = [item for item in self._refused if item[0] <= target]
            self._refused = [item for item in self._refused if item[0] > target]
        if refused:
            also = f"; {len(failed)} batches could not be published to the broker" if failed else ""
            raise UnserializableBatchError(
                f"{sum(n for _, n, _ in refused)} events could not be serialised as JSON and "
                f"were not published ({refused[0][2]}); the other events were{also}"
            )
        if failed:
            raise BrokerUnavailableError(
                f"{len(failed)} batches ({sum(n for _, n in failed)} events) could not be "
                f"published to the broker at {mask_url(self.settings.broker_url)}"
            )

    def _wait_applied(self, target: int, deadline: float, timeout: float) -> None:
        with self._lock:
            pending = self._outbox.ids_up_to(target)
            pending.update(b for b, seq in self._spilled.items() if seq <= target)
        last_error: Exception | None = None
        while pending:
            try:
                applied = self._applied(pending)
            except (SQLAlchemyError, StoreUnavailableError) as exc:
                applied, last_error = set(), exc
            if applied:
                pending -= applied
                with self._lock:
                    self._confirm(applied)
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cause = f"; last database error: {last_error}" if last_error else ""
                raise FlushTimeoutError(
                    f"{len(pending)} published batches were not applied in the database at "
                    f"{mask_url(self.settings.database_url)} within {timeout:g} s{cause}"
                )
            time.sleep(min(FLUSH_POLL_INTERVAL, remaining))

    def _applied(self, batch_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        store = self._store
        if store is None:
            missing = missing_sqlite_file(self.settings.database_url)
            if missing is not None:  # no worker has made it yet; connecting would, empty
                raise StoreUnavailableError(f"no database file at {missing} yet")
            # Read-only: on SQLite a plain BEGIN, so looking at the ledger never takes the
            # write lock the workers need. Made outside the lock (it takes 100 ms and more
            # with the driver's imports): ``record`` must never wait for it.
            made: SessionStore | None = SessionStore(
                self.settings.database_url, settings=self.settings, read_only=True
            )
            with self._lock:  # several threads may flush at once; one store (one pool) for all
                if self._store is None:
                    self._store, made = made, None
                store = self._store
            assert store is not None
            if made is not None:
                made.dispose()
        wanted = list(batch_ids)
        found: set[uuid.UUID] = set()
        for start in range(0, len(wanted), LEDGER_QUERY_CHUNK):
            found |= store.applied_batch_ids(wanted[start : start + LEDGER_QUERY_CHUNK])
        return found

    def _report_spool_left(self) -> None:
        """Say at close what waits in the spool: kept, not lost, but only a tracker that opens
        the same spool later publishes it (a burst can leave many batches a short close did not
        replay)."""
        if self._spool is None:
            return
        try:
            left = self._spool.stats()
        except Exception:
            log.exception("session tracker: could not read the spool at close")
            return
        if left.batches:
            log.warning(
                "session tracker closed with %d batches (%d events) waiting in the spool at %s: "
                "the next tracker that opens it publishes them (they expire after %g days)",
                left.batches,
                left.events,
                self._spool.path,
                self.settings.spool_max_age_days,
            )
        if left.quarantined_batches:
            log.error(
                "the spool at %s holds %d quarantined batches that can never be published "
                "(see its table quarantined_batches for why); they expire after %g days",
                self._spool.path,
                left.quarantined_batches,
                self.settings.spool_max_age_days,
            )

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Publish what is buffered and stop the background thread (waits up to ``timeout``).

        Batches waiting in the spool (spilled by a burst, or unsent) are replayed until it is
        empty or the deadline is near; what is left stays there for the next tracker. Events
        recorded after ``close`` are dropped and counted; closing twice is harmless.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # The publisher thread stops replaying in time for the join below to see it end.
            self._close_deadline = deadline - min(CLOSE_REPLAY_MARGIN, timeout / 4)
        self._stop_confirming.set()
        self._wake.set()
        self._thread.join(timeout)
        _live_trackers.discard(self)
        if self._thread.is_alive():
            log.warning(
                "session tracker closed with %d events not yet published after %g s",
                self.stats.events_pending,
                timeout,
            )
            return
        if self._confirmer is not None:
            self._confirmer.join(max(0.0, deadline - time.monotonic()))
        self._keep_unconfirmed_in_spool(deadline)
        self._report_spool_left()
        if self._owns_publisher and isinstance(self._publisher, CeleryPublisher):
            self._publisher.close()
        if self._owns_store and self._store is not None:
            self._store.dispose()
        if self._owns_spool and self._spool is not None:
            self._spool.close()

    def __enter__(self) -> SessionTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def stats(self) -> TrackerStats:
        """A snapshot of the counters."""
        with self._lock:
            return TrackerStats(
                events_recorded=self._appended,
                events_dropped=self._dropped,
                events_pending=self._appended - self._handled_events,
                batches_sent=self._batches_sent,
                events_sent=self._events_sent,
                batches_failed=self._batches_failed,
                events_failed=self._events_failed,
                events_spooled=self._events_spooled,
                events_lost=self._events_lost,
                batches_spilled=self._batches_spilled,
                events_spilled=self._events_spilled,
                batches_replayed=self._batches_replayed,
                events_replayed=self._events_replayed,
                batches_unconfirmed=len(self._outbox),
                batches_republished=self._batches_republished,
                events_republished=self._events_republished,
                batches_unverified=self._outbox.forgotten,
                batches_spooled_unconfirmed=self._batches_spooled_unconfirmed,
                events_refused=self._events_refused,
            )

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the background thread -----------------------------------------------------------

    def _run(self) -> None:
        due = time.monotonic() + self.flush_interval
        self._replay_spool()  # what an earlier run could not send goes first
        while True:
            timeout = due - time.monotonic()
            if self._spool_pending:
                timeout = min(timeout, REPLAY_INTERVAL)
            self._wake.wait(max(0.0, timeout))
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                closing = self._closed
                cut_all = closing or self._flush_requested or now >= due
                self._flush_requested = False
                # A flush, the interval or closing sends what is buffered *now*, even a
                # partial batch. Events recorded while those are published wait for the
                # next turn unless they fill a batch: cutting whatever arrived meanwhile
                # would, under a steady load, degrade into one message per few events.
                mark = self._appended if cut_all else self._cut
            if cut_all:
                due = now + self.flush_interval
            if self._guarded(self._replay_spool) == REPLAY_CHUNK:
                self._wake.set()  # a whole chunk went out: more may wait, go on at once
            self._guarded(self._republish_overdue)
            while (taken := self._take(mark)) is not None:
                self._send(*taken)
            if closing:
                # What a burst spilled (or an outage left) goes out before the agent exits,
                # as far as the time allows; the rest waits in the spool for the next tracker.
                while self._spool_pending and time.monotonic() < self._close_deadline:
                    if not self._guarded(self._replay_spool):
                        break  # the broker is down, or the spool is empty
                return

    @staticmethod
    def _guarded(work: Callable[[], T]) -> T | None:
        """Run one chore of the publisher thread; a bug in it is logged, never fatal to the
        thread (which would leave the agent's buffer to fill up unseen)."""
        try:
            return work()
        except Exception:
            log.exception("session tracker: %s failed; carrying on", work.__name__)
            return None

    def _take(self, mark: int) -> tuple[tuple[Event | RecordFields, ...], int] | None:
        """Cut the next batch off the buffer: a full one, or any while events up to the
        ``mark``-th are still uncut."""
        with self._lock:
            waiting = len(self._buffer)
            if waiting == 0 or (waiting < self.max_batch_events and self._cut >= mark):
                return None
            return self._cut_head(self.max_batch_events)

    def _wire_text(
        self, batch_id: uuid.UUID, events: tuple[Event | RecordFields, ...], seq: int
    ) -> tuple[str | None, tuple[Event | RecordFields, ...]]:
        """The wire text of a batch cut off the buffer, and the events it holds.

        Events that cannot be serialised (the model's validation rules them out, so only a bug
        lets one through) are set aside, counted and logged, and cost no other event: the text
        holds the others (``None`` if there are none). Never the broker's fault, so never
        spooled: a replay would fail on them every time, in every process.
        """
        try:
            return batch_json(batch_id, events), events
        except Exception as exc:  # never raised into ``record`` (which spills) nor the thread
            good, bad = serialisable(events)
            if not bad:  # each event serialises, the batch does not: a bug, it goes whole
                good, bad = [], [(event, first_line(exc)) for event in events]
        event, why = bad[0]
        session_id = event[0] if isinstance(event, tuple) else event.session_id
        self._refuse(seq, len(bad), f"{why}, in an event of session {session_id}", batch_id)
        return (batch_json(batch_id, good) if good else None), tuple(good)

    def _refuse(self, seq: int, events: int, why: str, batch_id: uuid.UUID | str) -> None:
        """``events`` of the batch ending at ``seq`` cannot be serialised: counted, logged, and
        reported by the next ``flush(wait=True)`` that covers them."""
        log.error(
            "session tracker set aside %d events of batch %s that cannot be serialised as JSON "
            "(%s): not published, not spooled (counted in stats.events_refused)",
            events,
            batch_id,
            why,
        )
        with self._lock:
            self._events_refused += events
            self._refused.append((seq, events, why))
            if len(self._refused) > MAX_UNCONFIRMED_BATCHES:
                del self._refused[0]

    def _send(self, events: tuple[Event | RecordFields, ...], seq: int) -> None:
        batch_id = uuid.uuid4()
        text, events = self._wire_text(batch_id, events, seq)
        error: BaseException | None = None
        if text is not None:
            try:
                error = self._publish_message(text, str(batch_id), len(events))
            except Exception as exc:  # a bug, not the broker; it must not kill the thread
                log.exception("could not publish a batch of %d events", len(events))
                error = exc
        if text is None or isinstance(error, UnserializableBatchError):
            if error is not None:
                self._refuse(seq, len(events), first_line(error), batch_id)
            with self._lock:
                self._handled_batch(seq)
            return
        batch: Batch | None = None
        spooled = False
        if error is not None:
            try:
                batch = Batch(
                    batch_id=batch_id,
                    events=tuple(
                        e if not isinstance(e, tuple) else record_event(e) for e in events
                    ),
                )
            except Exception:
                log.exception("could not form batch %s of %d events", batch_id, len(events))
            else:
                spooled = self._keep_in_spool(batch)
        with self._lock:
            if error is None:
                self._batches_sent += 1
                self._events_sent += len(events)
                self._keep_unconfirmed(batch_id, seq, text, len(events))
            else:
                self._batches_failed += 1
                self._events_failed += len(events)
                if spooled:
                    self._events_spooled += len(events)
                    self._spool_pending = True
                else:
                    self._events_lost += len(events)
                self._failed.append((seq, len(events)))
                if len(self._failed) > MAX_UNCONFIRMED_BATCHES:
                    del self._failed[0]
            self._handled_batch(seq)
        if error is not None and batch is not None and self._on_unsent is not None:
            try:
                self._on_unsent(batch, error)
            except Exception:
                log.exception("the on_unsent handler failed for batch %s", batch.batch_id)

    def _keep_in_spool(self, batch: Batch) -> bool:
        if self._spool is None:
            log.error(
                "batch %s (%d events) could not be published and there is no spool: lost",
                batch.batch_id,
                len(batch.events),
            )
            return False
        try:
            return self._spool.put(batch.to_message())
        except Exception:
            log.exception("could not write batch %s to the spool: lost", batch.batch_id)
            return False

    def _replay_spool(self) -> int:
        """Publish spooled batches oldest first, while the broker takes them (at most
        :data:`REPLAY_CHUNK`); how many went out."""
        if self._spool is None or not self._spool_pending:
            return 0
        if time.monotonic() < self._broker_down_until:
            return 0
        try:
            waiting = self._spool.claim(REPLAY_CHUNK, REPLAY_CLAIM_SECONDS)
            # Nothing to claim: empty, or another process is replaying what is left (look
            # again later, in case it dies doing so).
            left = bool(waiting) or len(self._spool) > 0
        except Exception:
            log.exception("could not read the spool at %s", self._spool.path)
            return 0
        if not waiting:
            with self._lock:
                self._spool_pending = left
            return 0
        published: list[int] = []
        quarantined: list[int] = []
        try:
            for spooled in waiting:
                error = self._publish_message(spooled.text, spooled.batch_id, spooled.events)
                if isinstance(error, UnserializableBatchError):
                    # It would fail the same way every time: set aside, the rest goes on.
                    self._spool.quarantine(spooled.seq, first_line(error))
                    quarantined.append(spooled.seq)
                    continue
                if error is not None:
                    return len(published)  # the broker is down again: the rest waits
                published.append(spooled.seq)
                batch_id = uuid.UUID(spooled.batch_id)
                with self._lock:
                    self._batches_replayed += 1
                    self._events_replayed += spooled.events
                    # Replayed batches hold events recorded before any of this run's (``seq``
                    # 0), unless this tracker spilled them.
                    self._keep_unconfirmed(
                        batch_id,
                        self._spilled.pop(batch_id, 0),
                        spooled.text,
                        spooled.events,
                        first_published=spooled.spooled_at,
                    )
        finally:
            # Removed once published (a crash before this costs a harmless second copy).
            self._spool.remove(*published)
            handled = {*published, *quarantined}
            self._spool.release(*(b.seq for b in waiting if b.seq not in handled))
            if published:
                log.info("replayed %d spooled batches", len(published))
        return len(published)

    # -- confirming published batches against the ledger -----------------------------------

    def _keep_unconfirmed(
        self,
        batch_id: uuid.UUID,
        seq: int,
        message: str | dict[str, Any],
        events: int,
        first_published: float | None = None,
    ) -> None:
        """Hold a batch just published until the ledger lists it (call under ``_lock``);
        ``first_published`` (a ``time.time()``) dates one an earlier run published."""
        size = len(message) if isinstance(message, str) else len(json.dumps(message))
        now = time.monotonic()
        entry = Unconfirmed(batch_id, seq, message, events, size, now)
        if first_published is not None:
            entry.first_published_at = now - max(0.0, time.time() - first_published)
        if self._outbox.add(entry) and not self._unverified_warned:
            self._unverified_warned = True
            log.warning(
                "more than %d published batches (or %d MB) are waiting for the ledger at %s; "
                "the oldest are no longer kept for republishing (counted in "
                "stats.batches_unverified)",
                self._outbox.max_batches,
                self._outbox.max_bytes // (1024 * 1024),
                mask_url(self.settings.database_url),
            )

    def _confirm_loop(self) -> None:
        while not self._stop_confirming.wait(CONFIRM_POLL_INTERVAL):
            self._check_ledger()

    def _check_ledger(self, min_age: float = CONFIRM_MIN_AGE) -> None:
        """Drop the batches (published ``min_age`` ago) the ledger lists; note the missing
        ones, waking the publisher thread when some are due to be published again."""
        with self._lock:
            asked = self._outbox.published_before(time.monotonic() - min_age)
            # Spilled batches too: another tracker sharing the spool may have replayed them.
            asked += self._spilled
        if not asked:
            return
        try:
            applied = self._applied(asked)
        except Exception as exc:  # the agent's database access is best effort, never fatal
            if not self._ledger_failing:
                log.warning(
                    "cannot read the ledger at %s to confirm published batches (%s); they are "
                    "kept and not republished until it answers",
                    mask_url(self.settings.database_url),
                    exc,
                )
            self._ledger_failing = True
            return
        if self._ledger_failing:
            log.warning("the ledger at %s answers again", mask_url(self.settings.database_url))
        self._ledger_failing = False
        self._ledger_answered = True
        with self._lock:
            self._confirm(applied)
            self._missing = set(asked) - applied
            due = bool(self._outbox.overdue(self._missing, time.monotonic()))
        if due:
            self._wake.set()

    def _confirm(self, applied: set[uuid.UUID]) -> None:
        """The ledger lists ``applied``: nothing more to wait for (call under ``_lock``)."""
        self._outbox.confirm(applied)
        for batch_id in applied:
            self._spilled.pop(batch_id, None)

    def _republish_overdue(self) -> None:
        """Publish again the batches the ledger still lacks after their confirm timeout."""
        with self._lock:
            due = self._outbox.overdue(self._missing, time.monotonic())[:REPLAY_CHUNK]
            self._missing.difference_update(entry.batch_id for entry in due)
        if due and self._backlog_waiting():
            return  # the next look at the ledger finds them missing again, if they still are
        for entry in due:
            assert entry.message is not None  # kept whenever republishing is on
            error = self._publish_message(entry.message, str(entry.batch_id), entry.events)
            if isinstance(error, UnserializableBatchError):  # it went out once: a bug
                log.error("batch %s cannot be published again (%s)", entry.batch_id, error)
                with self._lock:
                    self._outbox.confirm({entry.batch_id})
                continue
            if error is not None:
                # The broker is down again: the batch stays in the outbox, due, and is tried
                # again after the broker-down pause (or goes to the spool at close).
                return
            log.warning(
                "batch %s (%d events) was not applied %.0f s after it was published; "
                "published it again (the ledger makes a second copy harmless)",
                entry.batch_id,
                entry.events,
                time.monotonic() - entry.published_at,
            )
            with self._lock:
                self._outbox.republished(entry, time.monotonic())
                self._batches_republished += 1
                self._events_republished += entry.events

    def _backlog_waiting(self) -> bool:
        """Whether the ingest queue still holds messages no worker has taken: then a missing
        batch is most likely among them, and a copy would only lengthen the backlog. A
        publisher that cannot tell counts as "no"; a broker that does not answer as "yes" (a
        republish would fail anyway)."""
        queued_messages = getattr(self._publisher, "queued_messages", None)
        if queued_messages is None:
            return False
        now = time.monotonic()
        if now < self._broker_down_until:
            return True  # the broker is away: a republish would fail anyway
        if now < self._backlog_known_until:
            return True  # a backlog seen a moment ago: spare the broker another look
        try:
            waiting = int(queued_messages())
        except Exception as exc:
            log.debug("could not read the ingest queue's length: %s", exc)
            waiting = 1  # cannot tell: as good as a backlog (a republish would likely fail)
        if waiting > 0:
            self._backlog_known_until = time.monotonic() + BACKLOG_RECHECK_INTERVAL
        return waiting > 0

    def _keep_unconfirmed_in_spool(self, deadline: float) -> None:
        """At close: batches the ledger has not confirmed go to the spool, for the next
        process to publish again, after a short wait for the last ones to be applied.

        Only when the ledger has answered: without it nothing tells a lost batch from an
        applied one, and the spool would fill with copies (crowding out unsent batches).
        """
        if not self._outbox.republishing or not len(self._outbox):
            return
        if self._confirmer is not None and self._confirmer.is_alive():
            return  # still stuck in a query: the database is not answering
        wait_until = min(deadline, time.monotonic() + CLOSE_CONFIRM_WAIT)
        while True:
            self._check_ledger(min_age=-1.0)
            if self._ledger_failing or not self._ledger_answered:
                log.warning(
                    "closing with %d published batches the ledger at %s could not confirm; "
                    "they are not kept for republishing",
                    len(self._outbox),
                    mask_url(self.settings.database_url),
                )
                return
            if not len(self._outbox) or time.monotonic() >= wait_until:
                break
            time.sleep(FLUSH_POLL_INTERVAL)
        with self._lock:
            left = self._outbox.drain()
        if not left:
            return
        if self._spool is None:
            log.warning(
                "closing with %d published batches not yet seen in the ledger and no spool to "
                "keep them in: if a worker lost one, nothing will publish it again",
                len(left),
            )
            return
        self._spool_unconfirmed(left)
        log.info(
            "closing with %d published batches not yet seen in the ledger; kept them in the "
            "spool for the next run to publish again",
            len(left),
        )

    def _spool_unconfirmed(self, entries: list[Unconfirmed]) -> None:
        """Keep ``entries`` in the spool, in one transaction (after a burst there are hundreds),
        each dated by its first publish."""
        assert self._spool is not None
        now, wall = time.monotonic(), time.time()
        items = [
            SpillItem(
                str(entry.batch_id),
                entry.message
                if isinstance(entry.message, str)
                else json.dumps(entry.message, separators=(",", ":")),
                entry.events,
                since=wall - (now - entry.first_published_at),
            )
            for entry in entries
            if entry.message is not None
        ]
        try:
            kept = self._spool.put_texts(items)
        except Exception:
            log.exception("could not write %d unconfirmed batches to the spool", len(items))
            return
        with self._lock:
            self._batches_spooled_unconfirmed += kept
            self._spool_pending = self._spool_pending or kept > 0

    def _publish_message(
        self, message: dict[str, Any] | str, batch_id: str, events: int | None = None
    ) -> BaseException | None:
        """Publish ``message`` (or its JSON text) under the retry policy; the last error, or
        ``None`` once sent."""
        if events is None:
            events = len(message.get("events", ())) if isinstance(message, dict) else 0
        if time.monotonic() < self._broker_down_until:
            self._note_failure(batch_id, events, None)
            return BrokerUnavailableError(
                f"broker at {mask_url(self.settings.broker_url)} is down; batch not tried"
            )
        error: BaseException | None = None
        for attempt in range(PUBLISH_ATTEMPTS):
            if attempt:
                time.sleep(PUBLISH_RETRY_DELAYS[min(attempt, len(PUBLISH_RETRY_DELAYS)) - 1])
            try:
                self._hand_over(message)
            except UnserializableBatchError as exc:
                return exc  # the message's fault: no retry, and the broker is not down
            except Exception as exc:
                error = exc
                log.debug("publishing batch %s failed (attempt %d)", batch_id, attempt + 1)
                continue
            self._note_success()
            return None
        assert error is not None
        self._note_failure(batch_id, events, error)
        return error

    def _hand_over(self, message: dict[str, Any] | str) -> None:
        """Give ``message`` to the publisher: as text to one that takes text (``publish_text``,
        as :class:`CeleryPublisher` does), else as the dict :meth:`Batch.to_message` makes.

        Raises :class:`UnserializableBatchError` when the message cannot be encoded (by the
        publisher, or into that dict): then the broker is not to blame.
        """
        try:
            if isinstance(message, str):
                publish_text = getattr(self._publisher, "publish_text", None)
                if publish_text is not None:
                    publish_text(message)
                    return
                message = _message_of(message)
            self._publisher(message)
        except (UnicodeError, PydanticSerializationError, RecursionError) as exc:
            raise UnserializableBatchError(f"cannot be serialised: {first_line(exc)}") from exc

    def _note_failure(self, batch_id: str, events: int, error: BaseException | None) -> None:
        if self._failing_since is None:
            self._failing_since = self._batches_failed
            log.warning(
                "cannot publish to the broker at %s; batch %s (%d events) is set aside, and "
                "so will be further batches until it answers: %s",
                mask_url(self.settings.broker_url),
                batch_id,
                events,
                error,
            )
        else:
            log.debug("batch %s (%d events) set aside", batch_id, events)
        if error is not None:
            self._broker_down_until = time.monotonic() + self._broker_down_pause
            self._broker_down_pause = min(MAX_BROKER_DOWN_PAUSE, self._broker_down_pause * 2)

    def _note_success(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "the broker at %s answers again; %d batches could not be sent meanwhile",
                mask_url(self.settings.broker_url),
                self._batches_failed - self._failing_since,
            )
        self._failing_since = None
        self._broker_down_pause = BROKER_DOWN_PAUSE

    def _after_fork_in_child(self) -> None:
        """A forked child starts empty: the buffered events are the parent's to publish."""
        closed = self._closed
        if self._spool is not None:
            self._spool = self._spool.reopen_after_fork()
        self._reset_state()
        # Replaying what is already spooled is the parent's job; the child only adds to it.
        self._spool_pending = False
        self._closed = closed
        if isinstance(self._publisher, CeleryPublisher):
            self._publisher.forget_after_fork()
        if self._store is not None:
            self._store.engine.dispose(close=False)
        if not closed:
            self._start()


def _message_of(text: str) -> dict[str, Any]:
    """The batch message a wire text holds, for a publisher that takes dicts; raises
    :class:`UnserializableBatchError` when it holds none."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UnserializableBatchError(f"not a JSON document: {first_line(exc)}") from exc
    if not isinstance(message, dict):
        raise UnserializableBatchError(f"not a JSON object but {type(message).__name__}")
    return message


def open_spool(settings: Settings) -> BatchSpool | None:
    """The spool ``settings`` name, or ``None`` (logged) when its folder cannot be used."""
    try:
        return BatchSpool(
            settings.spool_dir,
            key=hashlib.sha256(settings.broker_url.encode()).hexdigest()[:16],
            max_batches=settings.spool_max_batches,
            max_bytes=settings.spool_max_megabytes * 1024 * 1024,
            max_age_seconds=settings.spool_max_age.total_seconds(),
        )
    except (OSError, sqlite3.Error) as exc:
        log.error("no spool at %s (%s): unsent batches will be lost", settings.spool_dir, exc)
        return None


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """On SIGTERM, flush every tracker (to the broker or the spool), then die as asked.

    Only where nobody else handles SIGTERM: an application with its own handler (Celery,
    uvicorn, ...) should call ``tracker.close()`` from it.
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def _on_sigterm(signum: int, _frame: object) -> None:
        _close_at_exit()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, _on_sigterm)


#: Trackers not yet closed: closed at interpreter exit, restarted in a forked child.
_live_trackers: weakref.WeakSet[SessionTracker] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for tracker in list(_live_trackers):
        tracker.close()


def _restart_in_child() -> None:
    for tracker in list(_live_trackers):
        tracker._after_fork_in_child()


os.register_at_fork(after_in_child=_restart_in_child)
