"""The tracker's publisher thread: cut batches go to the broker, or to the spool.

:class:`BatchSender` is the thread. Every ``flush_interval`` (or as soon as a batch is full,
or on a flush) it cuts the buffer into batches and publishes each as one message, the batch's
JSON text made straight from the buffer. A batch keeps its ``batch_id`` through every attempt,
so a publish that timed out but did reach the broker is still applied once.

:class:`BrokerGate` is its policy towards the broker: a batch gets :data:`PUBLISH_ATTEMPTS`
quick attempts, then it is given up (written, whole and with its ``batch_id``, to the spool,
and handed to ``on_unsent``); while the broker stays down further batches are set aside
without trying, for a pause that doubles up to :data:`MAX_BROKER_DOWN_PAUSE`. Once a publish
succeeds again (or when a tracker starts and finds batches of an earlier run), the spool is
replayed oldest first, before newer batches. Batches the confirmer still lacks after their
confirm timeout are published again, unless the ingest queue holds a backlog.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sessions.batching import Cut, EventBuffer
from sessions.client_settings import ClientSettings
from sessions.confirming import Confirmations, message_text
from sessions.errors import (
    BrokerUnavailableError,
    UnserializableBatchError,
    first_line,
    is_pydantic_serialization_error,
)
from sessions.outbox import Unconfirmed
from sessions.plain import as_model
from sessions.publisher import Publisher
from sessions.redact import mask_url
from sessions.spool import BatchSpool, SpillItem
from sessions.stats import TrackerStats

# The tracker's parts log as one logger: an application configures ``sessions.tracker``.
log = logging.getLogger("sessions.tracker")

if TYPE_CHECKING:
    from sessions.events import Batch
    from sessions.plain import Buffered

T = TypeVar("T")
#: Called with each batch that could not be published and the last error (the spool's seam).
UnsentHandler = Callable[["Batch", BaseException], None]

#: Attempts at publishing one batch before it is given up.
PUBLISH_ATTEMPTS = 3
#: Seconds to wait before the second and third attempt.
PUBLISH_RETRY_DELAYS = (0.1, 0.5)
#: After a batch is given up, later batches are set aside untried for this many seconds ...
BROKER_DOWN_PAUSE = 1.0
#: ... doubling with every batch given up in a row, up to this.
MAX_BROKER_DOWN_PAUSE = 30.0
#: Seconds a queue backlog, once seen, holds back republishing before the queue is asked again.
BACKLOG_RECHECK_INTERVAL = 5.0
#: Spooled batches replayed per turn of the background thread (new batches wait meanwhile).
REPLAY_CHUNK = 50
#: While the spool holds batches, the thread tries to replay at least this often (seconds).
REPLAY_INTERVAL = 1.0
#: Seconds a replaying tracker claims spooled batches for (other agents sharing the spool
#: leave them alone meanwhile); far longer than publishing :data:`REPLAY_CHUNK` batches takes.
REPLAY_CLAIM_SECONDS = 60.0


class BrokerGate:
    """Publishes through ``publisher`` with quick retries, and pauses while the broker is down.

    Used by the publisher thread only. ``batches_failed`` says how many batches were given up
    so far (to say how many an outage cost).
    """

    def __init__(
        self, publisher: Publisher, broker_url: str, batches_failed: Callable[[], int]
    ) -> None:
        self.publisher = publisher
        self._broker_url = broker_url
        self._batches_failed = batches_failed
        #: ``time.monotonic()`` until which batches are set aside untried.
        self._down_until = 0.0
        self._pause = BROKER_DOWN_PAUSE
        #: ``batches_failed`` when the outage began; ``None`` while the broker answers.
        self._failing_since: int | None = None
        #: Until when a backlog, once seen, is taken as still there.
        self._backlog_known_until = 0.0

    @property
    def down(self) -> bool:
        """Whether the broker counts as down (a batch would be set aside untried)."""
        return time.monotonic() < self._down_until

    def publish(self, text: str, batch_id: str, events: int) -> BaseException | None:
        """Publish ``text`` under the retry policy; the last error, or ``None`` once sent."""
        if self.down:
            self._note_failure(batch_id, events, None)
            return BrokerUnavailableError(
                f"broker at {mask_url(self._broker_url)} is down; batch not tried"
            )
        error: BaseException | None = None
        for attempt in range(PUBLISH_ATTEMPTS):
            if attempt:
                time.sleep(PUBLISH_RETRY_DELAYS[min(attempt, len(PUBLISH_RETRY_DELAYS)) - 1])
            try:
                self._hand_over(text)
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

    def _hand_over(self, text: str) -> None:
        """Give ``text`` to the publisher.

        Raises :class:`UnserializableBatchError` when the message cannot be encoded: then the
        broker is not to blame.
        """
        try:
            self.publisher.publish_text(text)
        except Exception as exc:
            encoding = isinstance(exc, UnicodeError | RecursionError)
            if encoding or is_pydantic_serialization_error(exc):
                raise UnserializableBatchError(f"cannot be serialised: {first_line(exc)}") from exc
            raise

    def _note_failure(self, batch_id: str, events: int, error: BaseException | None) -> None:
        if self._failing_since is None:
            self._failing_since = self._batches_failed()
            log.warning(
                "cannot publish to the broker at %s; batch %s (%d events) is set aside, and "
                "so will be further batches until it answers: %s",
                mask_url(self._broker_url),
                batch_id,
                events,
                error,
            )
        else:
            log.debug("batch %s (%d events) set aside", batch_id, events)
        if error is not None:
            self._down_until = time.monotonic() + self._pause
            self._pause = min(MAX_BROKER_DOWN_PAUSE, self._pause * 2)

    def _note_success(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "the broker at %s answers again; %d batches could not be sent meanwhile",
                mask_url(self._broker_url),
                self._batches_failed() - self._failing_since,
            )
        self._failing_since = None
        self._pause = BROKER_DOWN_PAUSE

    def backlog_waiting(self) -> bool:
        """Whether the ingest queue still holds messages no worker has taken: then a missing
        batch is most likely among them, and a copy would only lengthen the backlog. A broker
        that is down, or does not answer, counts as "yes" (a republish would fail anyway); a
        publisher that cannot tell as "no"."""
        now = time.monotonic()
        if now < self._down_until:
            return True  # the broker is away: a republish would fail anyway
        if now < self._backlog_known_until:
            return True  # a backlog seen a moment ago: spare the broker another look
        try:
            waiting = self.publisher.queued_messages()
        except Exception as exc:
            log.debug("could not read the ingest queue's length: %s", exc)
            waiting = 1  # cannot tell: as good as a backlog (a republish would likely fail)
        if waiting is None:
            return False
        if waiting > 0:
            self._backlog_known_until = time.monotonic() + BACKLOG_RECHECK_INTERVAL
        return int(waiting) > 0


class BatchSender:
    """The publisher thread of one tracker: cuts ``buffer`` into batches and sends them
    through ``publisher``; replays ``spool`` (``None``: unsent batches are lost, counted);
    republishes what ``confirmations`` find lost; hands each batch given up to ``on_unsent``.

    ``wake`` is set by whoever has work for the thread (a full batch, a flush, a spill, a
    republish due, closing). ``settings`` give the broker (for log lines) and the spool's
    maximum age (for the close report).
    """

    def __init__(
        self,
        *,
        buffer: EventBuffer,
        publisher: Publisher,
        spool: BatchSpool | None,
        confirmations: Confirmations,
        settings: ClientSettings,
        flush_interval: float,
        wake: threading.Event,
        on_unsent: UnsentHandler | None = None,
    ) -> None:
        self._buffer = buffer
        self._spool = spool
        self._confirmations = confirmations
        self._settings = settings
        self._flush_interval = flush_interval
        self._wake = wake
        self._on_unsent = on_unsent
        self._lock = threading.Lock()
        #: The publisher thread's counters (the fields of the stats it counts).
        self._counts = TrackerStats()
        self.gate = BrokerGate(publisher, settings.broker_url, lambda: self._counts.batches_failed)
        #: Whether the spool may hold batches to replay (it may, at start: an earlier run's).
        self._spool_pending = spool is not None
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Have the thread look for work now."""
        self._wake.set()

    def spool_waiting(self) -> None:
        """Batches were added to the spool (a spill): replay them when the broker takes them."""
        with self._lock:
            self._spool_pending = True
        self._wake.set()

    def leave_spool(self) -> None:
        """Replay nothing already spooled (in a forked child: that is the parent's job; the
        child only adds to it)."""
        with self._lock:
            self._spool_pending = False

    def counts(self) -> TrackerStats:
        """The thread's counters (the other fields are 0)."""
        return self._counts

    def _count(self, **added: int) -> None:
        """Add to counters (named as the fields of :class:`TrackerStats`; call under the lock)."""
        counts = self._counts
        self._counts = dataclasses.replace(
            counts, **{name: getattr(counts, name) + n for name, n in added.items()}
        )

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        due = time.monotonic() + self._flush_interval
        self._replay_spool()  # what an earlier run could not send goes first
        while True:
            timeout = due - time.monotonic()
            if self._spool_pending:
                timeout = min(timeout, REPLAY_INTERVAL)
            self._wake.wait(max(0.0, timeout))
            self._wake.clear()
            now = time.monotonic()
            closing, cut_all, mark = self._buffer.next_turn(now >= due)
            if cut_all:
                due = now + self._flush_interval
            if self._guarded(self._replay_spool) == REPLAY_CHUNK:
                self._wake.set()  # a whole chunk went out: more may wait, go on at once
            self._guarded(self._republish_overdue)
            while (cut := self._buffer.take(mark)) is not None:
                self._send(cut)
            if closing:
                # What a burst spilled (or an outage left) goes out before the agent exits,
                # as far as the time allows; the rest waits in the spool for the next tracker.
                while self._spool_pending and time.monotonic() < self._buffer.close_deadline:
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

    def _send(self, cut: Cut) -> None:
        batch_id = uuid.uuid4()
        text, events = self._buffer.wire_text(batch_id, cut)
        pieces = self._buffer.pieces_for(text, events, cut)
        if pieces > 1:
            # Never published under this id: each part goes out (or to the spool) on its own.
            for part in self._buffer.split(cut, pieces):
                self._send(part)
            return
        error: BaseException | None = None
        if text is not None:
            try:
                error = self.gate.publish(text, str(batch_id), len(events))
            except Exception as exc:  # a bug, not the broker; it must not kill the thread
                log.exception("could not publish a batch of %d events", len(events))
                error = exc
        if text is None or isinstance(error, UnserializableBatchError):
            if error is not None:
                self._buffer.refuse(cut.seq, len(events), first_line(error), batch_id)
            self._buffer.handled(cut.seq)
            return
        if error is None:
            self._confirmations.keep(batch_id, cut.seq, text, len(events))
            with self._lock:
                self._count(batches_sent=1, events_sent=len(events))
            self._buffer.handled(cut.seq)
            return
        # Watched like a spill: once replayed, flush(wait=True) waits for it to be applied
        # instead of reporting it unpublished (and a later flush waits for it too).
        self._confirmations.spilled(batch_id, cut.seq)
        spooled = self._keep_in_spool(batch_id, text, len(events))
        if not spooled:
            self._confirmations.forget_spilled(batch_id)
        with self._lock:
            self._count(batches_failed=1, events_failed=len(events))
            if spooled:
                self._count(events_spooled=len(events))
                self._spool_pending = True
            else:
                self._count(events_lost=len(events))
        self._buffer.handled(cut.seq, failed=len(events), spooled_as=batch_id if spooled else None)
        if self._on_unsent is not None:
            self._hand_unsent(batch_id, events, error)

    def _hand_unsent(
        self, batch_id: uuid.UUID, events: tuple[Buffered, ...], error: BaseException
    ) -> None:
        """Give the ``on_unsent`` handler the batch that could not be published, as a model
        (made only here: the models are imported on the first batch given up)."""
        from sessions.events import Batch

        assert self._on_unsent is not None
        try:
            batch = Batch(batch_id=batch_id, events=tuple(map(as_model, events)))
        except Exception:  # a bug: the plain events were checked by the same rules
            log.exception("could not form batch %s for the on_unsent handler", batch_id)
            return
        try:
            self._on_unsent(batch, error)
        except Exception:
            log.exception("the on_unsent handler failed for batch %s", batch_id)

    def _keep_in_spool(self, batch_id: uuid.UUID, text: str, events: int) -> bool:
        """Keep the batch ``batch_id`` of ``events`` events, whose wire text is ``text``, in the
        spool; whether it did. The text it tried to publish, not the batch re-encoded: the size
        the byte limit was checked on (``json.dumps`` would escape every non-ASCII character,
        up to 6 bytes each)."""
        if self._spool is None:
            log.error(
                "batch %s (%d events) could not be published and there is no spool: lost",
                batch_id,
                events,
            )
            return False
        try:
            kept = self._spool.put_texts([SpillItem(str(batch_id), text, events)])
            return kept == 1
        except Exception:
            log.exception("could not write batch %s to the spool: lost", batch_id)
            return False

    def _replay_spool(self) -> int:
        """Publish spooled batches oldest first, while the broker takes them (at most
        :data:`REPLAY_CHUNK`); how many went out."""
        spool = self._spool
        if spool is None or not self._spool_pending or self.gate.down:
            return 0
        try:
            waiting = spool.claim(REPLAY_CHUNK, REPLAY_CLAIM_SECONDS)
            # Nothing to claim: empty, or another process is replaying what is left (look
            # again later, in case it dies doing so).
            left = bool(waiting) or len(spool) > 0
        except Exception:
            log.exception("could not read the spool at %s", spool.path)
            return 0
        if not waiting:
            with self._lock:
                self._spool_pending = left
            return 0
        published: list[int] = []
        quarantined: list[int] = []
        try:
            for spooled in waiting:
                error = self.gate.publish(spooled.text, spooled.batch_id, spooled.events)
                if isinstance(error, UnserializableBatchError):
                    # It would fail the same way every time: set aside, the rest goes on.
                    spool.quarantine(spooled.seq, first_line(error))
                    quarantined.append(spooled.seq)
                    continue
                if error is not None:
                    return len(published)  # the broker is down again: the rest waits
                published.append(spooled.seq)
                self._confirmations.keep(
                    uuid.UUID(spooled.batch_id),
                    None,  # this tracker's spill, or recorded before any of this run's events
                    spooled.text,
                    spooled.events,
                    first_published=spooled.spooled_at,
                )
                with self._lock:
                    self._count(batches_replayed=1, events_replayed=spooled.events)
        finally:
            # Removed once published (a crash before this costs a harmless second copy).
            spool.remove(*published)
            handled = {*published, *quarantined}
            spool.release(*(b.seq for b in waiting if b.seq not in handled))
            if published:
                log.info("replayed %d spooled batches", len(published))
        return len(published)

    def _republish_overdue(self) -> None:
        """Publish again the batches still unconfirmed after their confirm timeout."""
        due = self._confirmations.take_due(REPLAY_CHUNK)
        if due and self.gate.backlog_waiting():
            return  # the next look finds them missing again, if they still are
        for entry in due:
            assert entry.message is not None  # kept whenever republishing is on
            error = self.gate.publish(
                message_text(entry.message), str(entry.batch_id), entry.events
            )
            if isinstance(error, UnserializableBatchError):  # it went out once: a bug
                log.error("batch %s cannot be published again (%s)", entry.batch_id, error)
                self._confirmations.drop(entry.batch_id)
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
            self._confirmations.republished(entry)
            with self._lock:
                self._count(batches_republished=1, events_republished=entry.events)

    # -- at close, once the thread has ended ------------------------------------------------

    def keep_unconfirmed(self, entries: list[Unconfirmed]) -> None:
        """Keep batches published but never confirmed in the spool, for the next process to
        publish again (in one transaction: after a burst there are hundreds), each dated by
        its first publish."""
        if not entries:
            return
        if self._spool is None:
            log.warning(
                "closing with %d published batches not yet confirmed applied and no spool to "
                "keep them in: if a worker lost one, nothing will publish it again",
                len(entries),
            )
            return
        self._spool_unconfirmed(self._spool, entries)
        log.info(
            "closing with %d published batches not yet confirmed applied; kept them in the "
            "spool for the next run to publish again",
            len(entries),
        )

    def _spool_unconfirmed(self, spool: BatchSpool, entries: list[Unconfirmed]) -> None:
        now, wall = time.monotonic(), time.time()
        items = [
            SpillItem(
                str(entry.batch_id),
                message_text(entry.message),
                entry.events,
                since=wall - (now - entry.first_published_at),
            )
            for entry in entries
            if entry.message is not None
        ]
        try:
            kept = spool.put_texts(items)
        except Exception:
            log.exception("could not write %d unconfirmed batches to the spool", len(items))
            return
        with self._lock:
            self._count(batches_spooled_unconfirmed=kept)
            self._spool_pending = self._spool_pending or kept > 0

    def report_spool_left(self) -> None:
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
                self._settings.spool_max_age_days,
            )
        if left.quarantined_batches:
            log.error(
                "the spool at %s holds %d quarantined batches that can never be published "
                "(see its table quarantined_batches for why); they expire after %g days",
                self._spool.path,
                left.quarantined_batches,
                self._settings.spool_max_age_days,
            )
