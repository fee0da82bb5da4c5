"""A burst that outruns the publisher spills whole batches to the spool, on the agent's thread.

A plain loop of ``record`` calls fills the buffer in a fraction of a second, sooner still while
the publisher is connecting. Then the recording thread cuts the oldest batches off the buffer
(:meth:`EventBuffer.append` hands them over) and writes them, whole and with their
``batch_id``, to the spool in one transaction: the only I/O ``record`` ever does, and only
then. The publisher thread replays them like unsent batches. Only when the buffer and the
spool are both full is an event dropped, counted and logged at ERROR.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sessions.batching import Cut, EventBuffer
from sessions.confirming import Confirmations
from sessions.spool import BatchSpool, SpillItem

if TYPE_CHECKING:
    from sessions.plain import Buffered

# The tracker's parts log as one logger: an application configures ``sessions.tracker``.
log = logging.getLogger("sessions.tracker")

#: After the spool refused a spill (full, or failing), seconds ``record`` drops events at a full
#: buffer instead of trying the spool again for each one.
SPILL_REFUSED_PAUSE = 1.0


class Spiller:
    """Writes batches cut off a full ``buffer`` to ``spool``; ``confirmations`` watch them
    until they are applied, and ``on_kept`` is called when some were kept (to replay them)."""

    def __init__(
        self,
        buffer: EventBuffer,
        spool: BatchSpool,
        confirmations: Confirmations,
        on_kept: Callable[[], None],
    ) -> None:
        self._buffer = buffer
        self._spool = spool
        self._confirmations = confirmations
        self._on_kept = on_kept
        self._lock = threading.Lock()
        self._batches = self._events = 0

    def spill(self, cuts: Sequence[Cut]) -> None:
        """Write ``cuts`` to the spool; the batches it does not take are dropped (counted).

        Only a full buffer gets here, so a burst that outruns the publisher is slowed down by
        the spool's write (measured in ``bench.ingest --burst``) instead of losing events.
        """
        ids, cuts, texts = self._texts(cuts)
        for batch_id, cut in zip(ids, cuts, strict=True):
            self._confirmations.spilled(batch_id, cut.seq)
        items = [
            SpillItem(str(batch_id), text, len(events))
            for batch_id, (text, events) in zip(ids, texts, strict=True)
            if text is not None
        ]
        kept = 0
        try:
            kept = self._spool.put_texts(items)
        except Exception:
            log.exception("could not spill %d batches to %s", len(cuts), self._spool.path)
        refused = sum(item.events for item in items[kept:])
        index = 0  # of the batch in ``items``
        for batch_id, cut, (text, events) in zip(ids, cuts, texts, strict=True):
            if text is not None and index < kept:
                with self._lock:
                    self._batches += 1
                    self._events += len(events)
                self._buffer.handled(cut.seq)
            else:
                self._confirmations.forget_spilled(batch_id)
                self._buffer.handled(cut.seq, dropped=len(events))
            index += text is not None
        if refused:
            self._buffer.refuse_spills_for(SPILL_REFUSED_PAUSE)
        if kept:
            self._on_kept()  # the publisher replays them when it can
        if refused:
            log.error(
                "session tracker dropped %d events: its buffer is full (%d events) and the "
                "spool at %s did not take them (counted in stats.events_dropped)",
                refused,
                self._buffer.max_buffered_events,
                self._spool.path,
            )

    def _texts(
        self, cuts: Sequence[Cut]
    ) -> tuple[list[uuid.UUID], list[Cut], list[tuple[str | None, tuple[Buffered, ...]]]]:
        """A new batch id and the wire text of each cut, a cut whose text is too large for a
        broker cut into parts first (in flight, as the publisher does): ids, cuts and texts,
        in order."""
        ids: list[uuid.UUID] = []
        done: list[Cut] = []
        texts: list[tuple[str | None, tuple[Buffered, ...]]] = []
        waiting = list(cuts)
        while waiting:
            cut = waiting.pop(0)
            batch_id = uuid.uuid4()
            text, events = self._buffer.wire_text(batch_id, cut)
            pieces = self._buffer.pieces_for(text, events, cut)
            if pieces > 1:
                waiting[0:0] = self._buffer.split(cut, pieces)
                continue
            ids.append(batch_id)
            done.append(cut)
            texts.append((text, events))
        return ids, done, texts

    def counts(self) -> tuple[int, int]:
        """Batches and events spilled (and kept by the spool) so far."""
        with self._lock:
            return self._batches, self._events
