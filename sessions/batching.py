"""The tracker's buffer: events in recording order, cut into batches, and what became of them.

Each event appended gets a sequence number (``seq``: its position among all the tracker has
accepted). A batch is cut off the head of the buffer and stays *in flight* until it is handled:
published, spilled to the spool, set aside or given up. ``flush(wait=True)`` waits on that
(:meth:`EventBuffer.wait_handled`), and then reports what the batches it covers came to
(:meth:`EventBuffer.take_outcomes`: batches given up, events that could not be serialised).

Thread-safe, with a lock of its own that is never held across I/O: the agent's threads append
and the publisher thread cuts.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from sessions.errors import first_line
from sessions.plain import batch_json, serializable

if TYPE_CHECKING:
    from sessions.plain import Buffered

# The tracker's parts log as one logger: an application configures ``sessions.tracker``.
log = logging.getLogger("sessions.tracker")

#: Largest batch text the tracker publishes, in bytes of UTF-8: a batch of large messages or
#: metadata is cut into parts that fit, each a batch of its own. A broker refuses a message
#: past its limit (RabbitMQ 4's ``max_message_size`` is 16 MiB by default, and the text travels
#: escaped inside the task's body), and a refusal looks like a broker that is down.
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Outcomes (batches given up, events refused) kept for ``flush(wait=True)`` to report; beyond
#: this many, the oldest are forgotten (still counted in the stats).
MAX_REPORTED_BATCHES = 10_000


class FailedBatch(NamedTuple):
    """A batch given up on, for ``flush(wait=True)`` to report: the ``seq`` of its last event,
    how many ``events`` it held, and the id the spool keeps it under (``None``: lost)."""

    seq: int
    events: int
    spooled_as: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Cut:
    """A batch cut off the buffer: its events, and the ``seq`` of its last one."""

    events: tuple[Buffered, ...]
    seq: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What :meth:`EventBuffer.append` did with an event.

    ``dropped`` is ``"closed"`` or ``"full"`` when it was not kept (``first_drop`` the first
    such time); ``spill`` holds the batches cut off a full buffer to make room, which the
    caller writes to the spool.
    """

    spill: tuple[Cut, ...] = ()
    dropped: str | None = None
    first_drop: bool = False


#: The outcome of nearly every append (one object, no allocation on the hot path).
ACCEPTED = Appended()


class EventBuffer:
    """Events waiting to be cut into batches of ``max_batch_events``, at most
    ``max_buffered_events`` of them; a full one spills (when ``can_spill``) or drops.

    ``on_batch_ready`` is called (under the lock: it must only signal) when a whole batch waits.
    """

    def __init__(
        self,
        max_batch_events: int,
        max_buffered_events: int,
        *,
        spill_batches: int,
        can_spill: bool,
        on_batch_ready: Callable[[], None],
    ) -> None:
        self.max_batch_events = max_batch_events
        self.max_buffered_events = max_buffered_events
        self._spill_batches = spill_batches
        self._can_spill = can_spill
        self._on_batch_ready = on_batch_ready
        self._lock = threading.Lock()
        #: Signalled (under the lock) whenever more events have been handled.
        self._progress = threading.Condition(self._lock)
        self._events: list[Buffered] = []
        self._closed = False
        #: ``time.monotonic()`` by which a closing tracker's publisher thread stops replaying.
        self.close_deadline = 0.0
        self._flush_requested = False
        self._dropped_warned = False
        #: Events appended so far; each event's position in this sequence is its ``seq``.
        self._appended = 0
        #: Events cut into batches so far (``seq`` up to which batches are cut).
        self._cut = 0
        #: Batches cut and not yet handled: ``seq`` of their last event -> their events,
        #: oldest first (the publisher thread and a spill handle them apart).
        self._in_flight: dict[int, int] = {}
        #: Events whose batch was handled so far.
        self._handled = 0
        self._dropped = 0
        #: Until when a full buffer drops rather than spills (the spool refused a spill).
        self._spill_refused_until = 0.0
        #: Batches given up and not yet reported by a ``flush(wait=True)``.
        self._failed: list[FailedBatch] = []
        #: Events set aside as unserialisable, not yet reported: (seq, events, why).
        self._refused: list[tuple[int, int, str]] = []
        self._events_refused = 0

    # -- the agent's side -------------------------------------------------------------------

    def append(self, event: Buffered) -> Appended:
        """Keep ``event``, unless the buffer is closed, or full with nowhere to spill."""
        with self._lock:
            events = self._events
            if self._closed or len(events) >= self.max_buffered_events:
                return self._append_at_limit(event)
            events.append(event)
            self._appended += 1
            if len(events) >= self.max_batch_events:
                self._on_batch_ready()
            return ACCEPTED

    def _append_at_limit(self, event: Buffered) -> Appended:
        """:meth:`append` on a closed or full buffer (call under the lock)."""
        if self._closed or not self._may_spill():
            self._dropped += 1
            first, self._dropped_warned = not self._dropped_warned, True
            return Appended(dropped="closed" if self._closed else "full", first_drop=first)
        # A burst outran the publisher: the oldest batches go to the spool.
        spill = self._cut_for_spill()
        self._events.append(event)
        self._appended += 1
        if len(self._events) >= self.max_batch_events:
            self._on_batch_ready()
        return Appended(spill=spill)

    def _may_spill(self) -> bool:
        """Whether a full buffer can spill now (call under the lock)."""
        return self._can_spill and (
            not self._spill_refused_until or time.monotonic() >= self._spill_refused_until
        )

    def _cut_for_spill(self) -> tuple[Cut, ...]:
        """The oldest ``spill_batches`` batches, cut off a full buffer (call under the lock)."""
        spill = []
        for _ in range(self._spill_batches):
            if not self._events:
                break
            spill.append(self._cut_head(self.max_batch_events))
        return tuple(spill)

    def refuse_spills_for(self, seconds: float) -> None:
        """The spool refused a spill: drop at a full buffer for ``seconds`` instead."""
        with self._lock:
            self._spill_refused_until = time.monotonic() + seconds

    def request_flush(self) -> int:
        """Ask for everything buffered now to be cut; the ``seq`` a flush waits for."""
        with self._lock:
            self._flush_requested = True
            return self._appended

    def close(self, deadline: float) -> bool:
        """Accept no more events; ``False`` if already closed. ``deadline`` (a
        ``time.monotonic()``) is when the closing publisher thread stops replaying."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self.close_deadline = deadline
            return True

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the publisher thread's side --------------------------------------------------------

    def next_turn(self, interval_due: bool) -> tuple[bool, bool, int]:
        """Start a turn of the publisher thread: whether the tracker is closing, whether this
        turn cuts everything buffered now (closing, a flush, or ``interval_due``), and the
        ``seq`` up to which it cuts (see :meth:`take`)."""
        with self._lock:
            closing = self._closed
            cut_all = closing or self._flush_requested or interval_due
            self._flush_requested = False
            # A flush, the interval or closing sends what is buffered *now*, even a partial
            # batch. Events recorded while those are published wait for the next turn unless
            # they fill a batch: cutting whatever arrived meanwhile would, under a steady
            # load, degrade into one message per few events.
            return closing, cut_all, self._appended if cut_all else self._cut

    def take(self, mark: int) -> Cut | None:
        """Cut the next batch: a full one, or any while events up to the ``mark``-th are
        still uncut."""
        with self._lock:
            waiting = len(self._events)
            if waiting == 0 or (waiting < self.max_batch_events and self._cut >= mark):
                return None
            return self._cut_head(self.max_batch_events)

    def _cut_head(self, events: int) -> Cut:
        """Cut the oldest ``events`` (or all) off the buffer as one batch, noted in flight
        (call under the lock)."""
        if len(self._events) <= events:
            batch, self._events = self._events, []
        else:
            batch = self._events[:events]
            del self._events[:events]
        self._cut += len(batch)
        self._in_flight[self._cut] = len(batch)
        return Cut(tuple(batch), self._cut)

    @staticmethod
    def pieces_for(text: str | None, events: tuple[Buffered, ...], cut: Cut) -> int:
        """Into how many batches ``cut`` must be cut for each text to fit
        :data:`MAX_BATCH_BYTES`, going by ``text``, its wire text (holding ``events``): 1 when
        it fits, or holds one event, or had events set aside (cutting would refuse those
        twice). A batch is cut before it is published or spilled, never after: a text already
        out keeps its batch id whole."""
        if text is None or len(text) <= MAX_BATCH_BYTES // 4:  # a character: at most 4 bytes
            return 1
        size = len(text) if text.isascii() else len(text.encode())
        if size <= MAX_BATCH_BYTES or not len(events) == len(cut.events) > 1:
            return 1
        return min(len(events), size // MAX_BATCH_BYTES + 1)

    def split(self, cut: Cut, pieces: int) -> tuple[Cut, ...]:
        """``cut`` (in flight, never published) as ``pieces`` batches of about as many events
        each, each in flight on its own, in the order of their events."""
        size, extra = divmod(len(cut.events), pieces)
        parts: list[Cut] = []
        start, seq = 0, cut.seq - len(cut.events)
        for index in range(pieces):
            end = start + size + (index < extra)
            seq += end - start
            parts.append(Cut(cut.events[start:end], seq))
            start = end
        with self._lock:
            in_flight: dict[int, int] = {}
            for last, events in self._in_flight.items():
                if last == cut.seq:
                    in_flight.update((part.seq, len(part.events)) for part in parts)
                else:
                    in_flight[last] = events
            self._in_flight = in_flight
        return tuple(parts)

    def wire_text(self, batch_id: uuid.UUID, cut: Cut) -> tuple[str | None, tuple[Buffered, ...]]:
        """The wire text of a batch cut off the buffer, and the events it holds.

        Events that cannot be serialised (the model's validation rules them out, so only a bug
        lets one through) are set aside, counted and logged, and cost no other event: the text
        holds the others (``None`` if there are none). Never the broker's fault, so never
        spooled: a replay would fail on them every time, in every process.
        """
        events = cut.events
        try:
            return batch_json(batch_id, events), events
        except Exception as exc:  # never raised into ``record`` (which spills) nor the thread
            good, bad = serializable(events)
            if not bad:  # each event serialises, the batch does not: a bug, it goes whole
                good, bad = [], [(event, first_line(exc)) for event in events]
        event, why = bad[0]
        session_id = event[0] if isinstance(event, tuple) else event.session_id
        self.refuse(cut.seq, len(bad), f"{why}, in an event of session {session_id}", batch_id)
        return (batch_json(batch_id, good) if good else None), tuple(good)

    def refuse(self, seq: int, events: int, why: str, batch_id: uuid.UUID | str) -> None:
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
            if len(self._refused) > MAX_REPORTED_BATCHES:
                del self._refused[0]

    def handled(
        self,
        seq: int,
        *,
        failed: int = 0,
        dropped: int = 0,
        spooled_as: uuid.UUID | None = None,
    ) -> None:
        """The batch ending at ``seq`` is done with: published, spilled or set aside; or
        ``failed`` (its events given up: a flush reports them; ``spooled_as`` the batch id
        under which the spool keeps them, if it does) or ``dropped`` (not kept)."""
        with self._lock:
            if failed:
                self._failed.append(FailedBatch(seq, failed, spooled_as))
                if len(self._failed) > MAX_REPORTED_BATCHES:
                    del self._failed[0]
            self._dropped += dropped
            self._handled += self._in_flight.pop(seq)
            self._progress.notify_all()

    # -- flushing ---------------------------------------------------------------------------

    def _handled_through(self) -> int:
        """``seq`` up to which every event was handled (call under the lock)."""
        for seq, events in self._in_flight.items():
            return seq - events  # the oldest batch still in flight starts after this
        return self._cut

    def wait_handled(self, target: int, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every event up to ``target`` to be handled;
        how many of them still are not."""
        with self._lock:
            self._progress.wait_for(lambda: self._handled_through() >= target, timeout)
            return max(0, target - self._handled_through())

    def take_outcomes(self, target: int) -> tuple[list[FailedBatch], list[tuple[int, int, str]]]:
        """The batches given up and the events refused up to ``target``, each reported once:
        ``[FailedBatch]`` and ``[(seq, events, why)]``."""
        with self._lock:
            failed = [item for item in self._failed if item.seq <= target]
            self._failed = [item for item in self._failed if item.seq > target]
            refused = [item for item in self._refused if item[0] <= target]
            self._refused = [item for item in self._refused if item[0] > target]
        return failed, refused

    def counts(self) -> tuple[int, int, int, int]:
        """Events recorded, dropped, pending (accepted, not yet handled) and refused."""
        with self._lock:
            return (
                self._appended,
                self._dropped,
                self._appended - self._handled,
                self._events_refused,
            )
