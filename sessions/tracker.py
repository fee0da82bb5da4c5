"""The agent-side client: recording costs microseconds, a background thread publishes.

:meth:`SessionTracker.record` validates one event and appends it to an in-memory buffer; it
does no I/O unless the buffer is full (a burst: see below). Plainly valid ``record``,
``create`` and ``end`` arguments are kept as plain values (:mod:`sessions.plain`), anything
else as a model of :mod:`sessions.events`, imported (with pydantic) only then.
A daemon thread cuts the buffer into immutable batches (every ``flush_interval`` or as soon as
``max_batch_events`` are waiting) and publishes each as one Celery message.

:class:`SessionTracker` is a small front over its parts, each with one job:

* :mod:`sessions.batching`: the buffer, cut into batches, and what became of each batch (what
  ``flush(wait=True)`` waits for and reports);
* :mod:`sessions.spilling`: a burst that outruns the publisher spills whole batches to the
  durable local spool (:mod:`sessions.spool`), on the recording thread, and loses nothing
  while the spool has room;
* :mod:`sessions.sending`: the publisher thread, through a :class:`~sessions.publisher.Publisher`
  (Celery's, or any other): quick retries, a pause while the broker is down, batches given up
  go to the spool, the spool is replayed oldest first;
* :mod:`sessions.confirming`: the confirming thread, which asks a
  :class:`~sessions.confirming.Confirmer` (on Redis, the marks workers leave there:
  :mod:`sessions.redis_confirming`; else the database's ledger) which published batches were
  applied, so that one a worker lost is published again;
* :mod:`sessions.lifecycle`: fork, atexit and SIGTERM.

What cannot be serialised is never taken for a broker outage. The event model refuses every
value a JSON text cannot carry, so ``record``/``create``/``end`` raise for it; should an event
still fail (a hole in those rules), it alone is set aside (``stats.events_refused``, an ERROR,
and :class:`UnserializableBatchError` from ``flush(wait=True)``) and the rest of its batch goes
out; a spooled batch that can never be published is quarantined by the spool and the replay
goes on behind it.

On a Redis broker an agent needs no database URL: it confirms through Redis. Elsewhere,
agents without read access to the database turn republishing off with
``SESSIONS_CONFIRM_TIMEOUT_SECONDS=0`` (RabbitMQ loses nothing without it). On SIGTERM
(when the application has not installed a handler of its own) and at normal interpreter exit
the buffer is flushed, to the broker or to the spool, and batches still unconfirmed after a
short wait go to the spool too (if the confirmer answered), for the next process to publish
again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from sessions import lifecycle
from sessions.batching import ACCEPTED, Appended, EventBuffer, FailedBatch
from sessions.client_settings import ClientSettings
from sessions.confirming import Confirmations, Confirmer, confirmer_for
from sessions.errors import BrokerUnavailableError, FlushTimeoutError, UnserializableBatchError
from sessions.plain import plain_create, plain_end, plain_record
from sessions.publisher import CeleryPublisher, MessageFunction, Publisher, as_publisher
from sessions.redact import mask_url
from sessions.sending import BatchSender, UnsentHandler
from sessions.spilling import Spiller
from sessions.spool import BatchSpool
from sessions.stats import TrackerStats

if TYPE_CHECKING:
    from sessions.events import MessageEvent
    from sessions.plain import Buffered
    from sessions.rules import EndStatus
    from sessions.store import SessionStore

log = logging.getLogger(__name__)

#: The buffer holds at most this many events (a plainly valid ``record`` costs about 250
#: bytes while it waits: 12 MB), and at least two batches; beyond it, ``record`` spills the
#: oldest to the spool. Counted in events, not batches, so that a larger batch size does not
#: make every agent's buffer larger.
MAX_BUFFERED_EVENTS = 50_000
#: Events a full buffer spills at a time (whole batches, at least one), in one spool
#: transaction: each SQLite call gives up the GIL, and getting it back from a busy thread takes
#: a switch interval (fewer, bigger writes), while the ``record`` call that spills waits for
#: the write (not too big).
SPILL_EVENTS = 5_000
#: Seconds ``close`` waits by default for the buffer (and the spool) to be published.
CLOSE_TIMEOUT = 10.0
#: Seconds before ``close``'s deadline at which the publisher thread stops replaying the spool.
CLOSE_REPLAY_MARGIN = 1.0
#: ``spool`` argument meaning "the spool the settings name".
DEFAULT_SPOOL: Any = object()


class SessionTracker:
    """Records session events for the pipeline without ever blocking or failing the agent.

    ``settings`` name the broker and database (default: the environment);
    ``flush_interval`` (seconds, default ``settings.flush_interval_ms``) and
    ``max_batch_events`` (default ``settings.batch_max_events``) decide when a batch is cut.
    ``publisher`` replaces the Celery publisher: a :class:`~sessions.publisher.Publisher`, or
    a function taking each batch message as a dict (tests; :mod:`sessions.testing`);
    ``store`` is a database whose ledger confirms published batches (default: what
    ``settings.confirmer`` names, see :func:`~sessions.confirming.confirmer_for`), and
    ``confirmer`` replaces that choice altogether (:class:`~sessions.confirming.Confirmer`).
    ``spool`` keeps unsent batches and those a full buffer spills (default: the one in
    ``settings.spool_dir``; ``None``: no spool, unsent batches are lost and a full buffer
    drops, both counted); ``max_buffered_events`` bounds the buffer (default
    :data:`MAX_BUFFERED_EVENTS`, at least two batches); ``on_unsent`` receives each batch that
    could not be sent when first tried.

    :raises ValueError: ``flush_interval`` or ``max_batch_events`` is not positive.
    :raises TypeError: ``publisher`` is neither a publisher nor a function.
    """

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        flush_interval: float | None = None,
        max_batch_events: int | None = None,
        publisher: Publisher | MessageFunction | None = None,
        store: SessionStore | None = None,
        on_unsent: UnsentHandler | None = None,
        max_buffered_events: int | None = None,
        spool: BatchSpool | None = DEFAULT_SPOOL,
        confirmer: Confirmer | None = None,
    ) -> None:
        self.settings = settings or ClientSettings.from_environment()
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
        self.max_buffered_events = max_buffered_events or max(MAX_BUFFERED_EVENTS, 2 * batch_size)
        self._owns_publisher = publisher is None
        self._publisher = (
            CeleryPublisher(self.settings) if publisher is None else as_publisher(publisher)
        )
        self._owns_confirmer = confirmer is None
        self._confirmer = confirmer or confirmer_for(self.settings, store)
        self._on_unsent = on_unsent
        self._owns_spool = spool is DEFAULT_SPOOL
        self._spool: BatchSpool | None = open_spool(self.settings) if self._owns_spool else spool
        self._assemble()
        lifecycle.track(self)
        self._start()

    def _assemble(self) -> None:
        """Fresh parts: buffer, threads, counters (at start, and in a forked child)."""
        wake = threading.Event()
        self._buffer = EventBuffer(
            self.max_batch_events,
            self.max_buffered_events,
            spill_batches=max(1, SPILL_EVENTS // self.max_batch_events),
            can_spill=self._spool is not None,
            on_batch_ready=wake.set,
        )
        self._confirmations = Confirmations(self.settings, self._confirmer, on_due=wake.set)
        self._sender = BatchSender(
            buffer=self._buffer,
            publisher=self._publisher,
            spool=self._spool,
            confirmations=self._confirmations,
            settings=self.settings,
            flush_interval=self.flush_interval,
            wake=wake,
            on_unsent=self._on_unsent,
        )
        self._spiller = (
            Spiller(self._buffer, self._spool, self._confirmations, self._sender.spool_waiting)
            if self._spool is not None
            else None
        )

    def _start(self) -> None:
        self._sender.start(f"sessions-tracker-{id(self):x}")
        self._confirmations.start(f"sessions-confirm-{id(self):x}")

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
        if fields is None:
            from sessions.events import RecordEvent

            event: Buffered = RecordEvent(
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
        else:
            event = fields
        appended = self._buffer.append(event)
        if appended is not ACCEPTED:  # inline: this is the hot path
            self._after_append(appended)

    def create(
        self,
        session_id: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> None:
        """Start ``session_id`` (or a new run of it, if it has ended) with owner and metadata.

        Raises :class:`pydantic.ValidationError` (a ``ValueError``) naming the field for a bad
        id or metadata (not JSON, too large, too deep, NUL, lone surrogates).
        """
        event: Buffered | None = plain_create(session_id, user_id, metadata) if at is None else None
        if event is None:
            from sessions.events import CreateEvent

            event = CreateEvent(
                session_id=session_id,
                at=at or datetime.now(UTC),
                user_id=user_id,
                metadata=metadata,
            )
        self._append(event)

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
        from sessions.events import MessageEvent

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
        """End the current run of ``session_id`` as ``completed``, ``failed`` or ``expired``.

        Raises :class:`pydantic.ValidationError` (a ``ValueError``) naming the field for a bad
        id or any other status.
        """
        event: Buffered | None = plain_end(session_id, status) if at is None else None
        if event is None:
            from sessions.events import EndEvent

            # Any other status fails the model's validation, naming the field.
            status_ = cast("EndStatus", status)
            event = EndEvent(session_id=session_id, at=at or datetime.now(UTC), status=status_)
        self._append(event)

    def _append(self, event: Buffered) -> None:
        appended = self._buffer.append(event)
        if appended is not ACCEPTED:
            self._after_append(appended)

    def _after_append(self, appended: Appended) -> None:
        """Spill what a full buffer cut off, or say (once) that an event was dropped."""
        if appended.spill:
            assert self._spiller is not None  # a buffer without a spool never spills
            self._spiller.spill(appended.spill)
        elif appended.first_drop and appended.dropped == "closed":
            log.warning(
                "session tracker dropped an event: it is closed (counted in stats.events_dropped)"
            )
        elif appended.first_drop:
            log.error(
                "session tracker dropped an event: its buffer is full (%d events) and %s "
                "(counted in stats.events_dropped; logged once)",
                self.max_buffered_events,
                "it has no spool"
                if self._spool is None
                else f"the spool at {self._spool.path} refused the last spill",
            )

    # -- flushing and closing ---------------------------------------------------------------

    def flush(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Publish everything buffered now, without waiting for the flush interval.

        With ``wait=False`` this only asks the background thread and returns at once. With
        ``wait=True`` it returns once every event recorded before the call is applied in the
        database, and raises :class:`BrokerUnavailableError` if some of them could not be
        published and still wait in the spool (or were lost, without one; those the spool has
        replayed since are waited for like the others), :class:`UnserializableBatchError` if
        some could not be serialised (and were set aside: ``stats.events_refused``),
        :class:`~sessions.errors.StoreUnusableError` if it confirms through a ledger it cannot
        read at all (no ``store`` extra, or the environment's store settings break a rule), or
        :class:`FlushTimeoutError` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        target = self._buffer.request_flush()
        self._sender.wake()
        if wait:
            self._wait_published(target, deadline, timeout)
            self._confirmations.wait_applied(target, deadline, timeout)

    def _wait_published(self, target: int, deadline: float, timeout: float) -> None:
        unpublished = self._buffer.wait_handled(target, max(0.0, deadline - time.monotonic()))
        if unpublished:
            raise FlushTimeoutError(
                f"{unpublished} events were still not published after {timeout:g} s "
                f"(broker {mask_url(self.settings.broker_url)})"
            )
        failed, refused = self._buffer.take_outcomes(target)
        failed = self._still_unpublished(failed)
        if refused:
            also = f"; {len(failed)} batches could not be published to the broker" if failed else ""
            raise UnserializableBatchError(
                f"{sum(n for _, n, _ in refused)} events could not be serialised as JSON and "
                f"were not published ({refused[0][2]}); the other events were{also}"
            )
        if failed:
            raise BrokerUnavailableError(
                f"{len(failed)} batches ({sum(batch.events for batch in failed)} events) could "
                f"not be published to the broker at {mask_url(self.settings.broker_url)}"
            )

    def _still_unpublished(self, failed: list[FailedBatch]) -> list[FailedBatch]:
        """Of the batches given up, those lost and those the spool still holds. One the spool
        no longer holds was replayed since (by this tracker or another sharing the spool) and
        is published after all: the wait for applied batches covers it, as it covers spills."""
        spooled = {str(batch.spooled_as) for batch in failed if batch.spooled_as is not None}
        if not spooled or self._spool is None:
            return failed
        try:
            held = self._spool.holding(spooled)
        except Exception:  # an unreadable spool: report them all, as before it was asked
            log.exception("could not read the spool at %s", self._spool.path)
            return failed
        return [b for b in failed if b.spooled_as is None or str(b.spooled_as) in held]

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Publish what is buffered and stop the background thread (waits up to ``timeout``).

        Batches waiting in the spool (spilled by a burst, or unsent) are replayed until it is
        empty or the deadline is near; what is left stays there for the next tracker. Events
        recorded after ``close`` are dropped and counted; closing twice is harmless.
        """
        deadline = time.monotonic() + timeout
        # The publisher thread stops replaying in time for the join below to see it end.
        if not self._buffer.close(deadline - min(CLOSE_REPLAY_MARGIN, timeout / 4)):
            return
        self._confirmations.stop()
        self._sender.wake()
        self._sender.join(timeout)
        lifecycle.untrack(self)
        if self._sender.is_alive():
            log.warning(
                "session tracker closed with %d events not yet published after %g s",
                self.stats.events_pending,
                timeout,
            )
            return
        self._confirmations.join(max(0.0, deadline - time.monotonic()))
        self._sender.keep_unconfirmed(self._confirmations.unconfirmed_at_close(deadline))
        self._sender.report_spool_left()
        if self._owns_publisher:
            self._publisher.close()
        if self._owns_confirmer:
            self._confirmer.close()
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
        recorded, dropped, pending, refused = self._buffer.counts()
        spilled_batches, spilled_events = self._spiller.counts() if self._spiller else (0, 0)
        unconfirmed, unverified = self._confirmations.counts()
        return dataclasses.replace(
            self._sender.counts(),
            events_recorded=recorded,
            events_dropped=dropped,
            events_pending=pending,
            batches_spilled=spilled_batches,
            events_spilled=spilled_events,
            batches_unconfirmed=unconfirmed,
            batches_unverified=unverified,
            events_refused=refused,
        )

    @property
    def closed(self) -> bool:
        return self._buffer.closed

    def restart_after_fork(self) -> None:
        """In a forked child (:mod:`sessions.lifecycle` calls it): start empty, the buffered
        events are the parent's to publish, and so are its connections."""
        closed = self.closed
        if self._spool is not None:
            self._spool = self._spool.reopen_after_fork()
        self._publisher.after_fork()
        self._confirmer.after_fork()
        self._assemble()
        # Replaying what is already spooled is the parent's job; the child only adds to it.
        self._sender.leave_spool()
        if closed:
            self._buffer.close(0.0)
        else:
            self._start()


def open_spool(settings: ClientSettings) -> BatchSpool | None:
    """The spool ``settings`` name, or ``None`` (logged) when its folder cannot be used."""
    try:
        return BatchSpool(
            settings.spool_dir,
            key=hashlib.sha256(settings.broker_url.encode()).hexdigest()[:16],
            max_batches=settings.spool_max_batches,
            max_bytes=settings.spool_max_megabytes * 1024 * 1024,
            max_age_seconds=settings.spool_max_age.total_seconds(),
        )
    except OSError as exc:  # the folder (the file is opened on first use)
        log.error("no spool at %s (%s): unsent batches will be lost", settings.spool_dir, exc)
        return None
