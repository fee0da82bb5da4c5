"""What a tracker has done so far, in events and batches (``SessionTracker.stats``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
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
    #: Published batches not yet confirmed applied (by the ledger, or the marks on Redis).
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
