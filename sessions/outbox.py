"""Published batches the client keeps until the database's ledger shows them applied.

Publishing to the broker is not the end of a batch's journey. A worker that dies at the wrong
moment can take a message with it: kombu's Redis transport pops a message off the queue
*before* it records it as unacknowledged (kombu #305), and a broker that restarts without
persistence forgets its queue. Neither redelivers anything.

So the tracker keeps each published batch here, with its wire text and ``batch_id``, until
the ledger (:meth:`SessionStore.applied_batch_ids`) lists it. A batch still missing
:attr:`Outbox.republish_after` seconds after it was published is published again, and again
after twice that, and so on; the ledger makes a second copy change nothing.

A batch that is merely late must not be copied: workers that fall behind would get a copy of
everything in their backlog, fall further behind, and get more copies. The queue is first in,
first out, so the evidence of a *lost* batch is that a batch published after it has been
applied while it has not. Only such a batch is republished, or the newest one (nothing was
published after it to tell; copying one batch costs nothing); and the tracker also holds back
while the broker's queue still has messages no worker took (:meth:`Publisher.
queued_messages`), since a worker killed holding reserved messages breaks the order until
they are restored. Entries are kept in memory only,
bounded by count and bytes; beyond the bounds the oldest are forgotten (counted: they were
published, just not yet seen applied).

This module knows nothing of threads or brokers; :class:`~sessions.confirming.Confirmations`
drives it under its own lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class Unconfirmed:
    """One published batch not yet seen in the ledger."""

    batch_id: uuid.UUID
    #: The tracker's sequence number of the batch's last event (0: replayed from the spool).
    seq: int
    #: The wire form as published (JSON text, or the message dict of a spooled batch); ``None``
    #: when republishing is off and only the id is kept (for ``flush(wait=True)``).
    message: str | dict[str, object] | None
    events: int
    size: int
    #: ``time.monotonic()`` of the latest publish.
    published_at: float
    #: Times it was published again.
    republished: int = 0
    #: Position of its latest publish among all the outbox has seen (set by the outbox).
    order: int = 0
    #: ``time.monotonic()`` of the first publish, by this process or (for a batch replayed
    #: from the spool) an earlier one; 0: set by the outbox to ``published_at``.
    first_published_at: float = 0.0

    def due_at(self, republish_after: float) -> float:
        """When a batch still unconfirmed is published again: the wait doubles each time."""
        return self.published_at + republish_after * float(2**self.republished)


class Outbox:
    """Unconfirmed batches in publish order, bounded by ``max_batches`` and ``max_bytes``.

    ``republish_after`` 0 means the batches' text is not kept and nothing is republished.
    A batch first published more than ``max_age`` seconds ago is never published again, but
    forgotten: the ledger forgets applied batches too (``SESSIONS_LEDGER_RETENTION_DAYS``,
    which the settings keep longer than the spool's maximum age, passed here), and a copy
    arriving after its batch's ledger row was purged would count twice.
    """

    def __init__(
        self,
        republish_after: float,
        max_batches: int,
        max_bytes: int,
        max_age: float = float("inf"),
    ) -> None:
        self.republish_after = republish_after
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._entries: dict[uuid.UUID, Unconfirmed] = {}
        self._bytes = 0
        #: Batches forgotten at the bounds before the ledger confirmed them.
        self.forgotten = 0
        #: ``order`` of the latest publish, and of the latest publish the ledger confirmed.
        self._published = 0
        self._newest_confirmed = 0

    @property
    def republishing(self) -> bool:
        return self.republish_after > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[uuid.UUID]:
        return iter(list(self._entries))

    def entries(self) -> list[Unconfirmed]:
        """Every entry, oldest first (a snapshot)."""
        return list(self._entries.values())

    def add(self, entry: Unconfirmed) -> list[Unconfirmed]:
        """Keep ``entry`` (published just now); returns the oldest entries it pushed out."""
        if not self.republishing:
            entry.message, entry.size = None, 0
        old = self._entries.pop(entry.batch_id, None)
        if old is not None:
            self._bytes -= old.size
        self._published += 1
        entry.order = self._published
        if old is not None:
            entry.first_published_at = old.first_published_at
        elif not entry.first_published_at:
            entry.first_published_at = entry.published_at
        self._entries[entry.batch_id] = entry
        self._bytes += entry.size
        evicted: list[Unconfirmed] = []
        while len(self._entries) > self.max_batches or (
            self._bytes > self.max_bytes and len(self._entries) > 1
        ):
            oldest = self._entries.pop(next(iter(self._entries)))
            self._bytes -= oldest.size
            evicted.append(oldest)
        self.forgotten += len(evicted)
        return evicted

    def confirm(self, batch_ids: Iterable[uuid.UUID]) -> None:
        """The ledger lists ``batch_ids``: they are applied and need nothing more."""
        for batch_id in batch_ids:
            entry = self._entries.pop(batch_id, None)
            if entry is not None:
                self._bytes -= entry.size
                self._newest_confirmed = max(self._newest_confirmed, entry.order)

    def ids_up_to(self, seq: int) -> set[uuid.UUID]:
        """Batches holding events recorded up to ``seq`` (replayed ones included)."""
        return {batch_id for batch_id, entry in self._entries.items() if entry.seq <= seq}

    def published_before(self, moment: float) -> list[uuid.UUID]:
        """Batches last published before ``moment``: worth asking the ledger about."""
        return [b for b, entry in self._entries.items() if entry.published_at < moment]

    def overdue(self, batch_ids: Iterable[uuid.UUID], now: float) -> list[Unconfirmed]:
        """Of ``batch_ids`` (just found missing from the ledger), those due to be published
        again: past their wait, and overtaken by a later batch or the newest one."""
        if not self.republishing:
            return []
        due = []
        for batch_id in batch_ids:
            entry = self._entries.get(batch_id)
            if entry is not None and now - entry.first_published_at > self.max_age:
                self.remove(batch_id)  # too old to copy safely (see the class docstring)
                self.forgotten += 1
                continue
            if (
                entry is not None
                and entry.due_at(self.republish_after) <= now
                and (entry.order < self._newest_confirmed or entry.order == self._published)
            ):
                due.append(entry)
        return due

    def republished(self, entry: Unconfirmed, now: float) -> None:
        """``entry`` went out again at ``now``; the next wait is twice as long."""
        if entry.batch_id in self._entries:
            self._published += 1
            entry.order = self._published
            entry.published_at = now
            entry.republished += 1

    def remove(self, batch_id: uuid.UUID) -> Unconfirmed | None:
        entry = self._entries.pop(batch_id, None)
        if entry is not None:
            self._bytes -= entry.size
        return entry

    def drain(self) -> list[Unconfirmed]:
        """Every entry, oldest first, leaving the outbox empty."""
        entries = list(self._entries.values())
        self._entries.clear()
        self._bytes = 0
        return entries
