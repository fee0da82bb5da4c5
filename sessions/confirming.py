"""Confirming published batches: which of them a worker has applied.

A published batch is not forgotten yet: it waits in the :mod:`~sessions.outbox` until a
:class:`Confirmer` says it was applied, and is published again if it is still missing
``confirm_timeout_seconds`` later (then after twice that, and so on) and the evidence says
lost rather than late (:mod:`sessions.outbox` explains which). ``flush(wait=True)`` asks the
same confirmer until every batch it covers is applied.

The :class:`Confirmer` is a seam, and :func:`confirmer_for` picks one from the settings
(``SESSIONS_CONFIRMER``): on a Redis broker, the :class:`~sessions.redis_confirming.
RedisConfirmer` reads the marks workers leave there (broker access only: the agent needs no
database URL); otherwise :class:`LedgerConfirmer` reads the database's ledger (it imports the
store, and SQLAlchemy, only on its first look). :class:`Confirmations` is the confirming
thread and the batches it watches.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from sessions.client_settings import ClientSettings
from sessions.errors import (
    BrokerUnavailableError,
    FlushTimeoutError,
    StoreUnavailableError,
    StoreUnusableError,
)
from sessions.outbox import Outbox, Unconfirmed
from sessions.redact import mask_url

if TYPE_CHECKING:
    from sessions.store import SessionStore

# The tracker's parts log as one logger: an application configures ``sessions.tracker``.
log = logging.getLogger("sessions.tracker")

#: Published batches kept until they are confirmed; the oldest are forgotten beyond ...
MAX_UNCONFIRMED_BATCHES = 10_000
#: ... or beyond this many bytes of their wire text.
MAX_UNCONFIRMED_BYTES = 64 * 1024 * 1024
#: Seconds between the confirming thread's looks ...
CONFIRM_POLL_INTERVAL = 1.0
#: ... for batches published at least this long ago (younger ones are rarely applied yet).
CONFIRM_MIN_AGE = 0.5
#: At close, seconds to wait for the last published batches to be confirmed.
CLOSE_CONFIRM_WAIT = 2.0
#: Seconds between looks in ``flush(wait=True)`` (and while waiting at close).
FLUSH_POLL_INTERVAL = 0.05
#: Batch ids per ledger query.
LEDGER_QUERY_CHUNK = 1000


class Confirmer(Protocol):
    """Says which published batches have been applied."""

    @property
    def where(self) -> str:
        """What it reads, for log lines and errors ("the ledger at postgresql://...")."""
        ...

    def applied(self, batch_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """The ones of ``batch_ids`` known to be applied.

        :raises StoreUnavailableError, BrokerUnavailableError: it cannot answer now
            (``flush(wait=True)`` asks again until its deadline; the confirming thread
            waits, republishing nothing).
        """
        ...

    def close(self) -> None:
        """Let go of connections."""
        ...

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them."""
        ...


class LedgerConfirmer:
    """Reads the ledger of the database ``settings`` name (or of ``store``, if given).

    The store is made read-only on first use (on SQLite a plain ``BEGIN``, so looking never
    takes the write lock the workers need), never before: a tracker that only records imports
    no SQLAlchemy until it confirms, and a database file no worker made yet is not created.
    """

    def __init__(self, settings: ClientSettings, store: SessionStore | None = None) -> None:
        self.settings = settings
        self._store = store
        self._owns_store = store is None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"the ledger at {mask_url(self.settings.database_url)}"

    def applied(self, batch_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """The ids of ``batch_ids`` the ledger holds.

        :raises StoreUnavailableError: the database does not answer (worth waiting for).
        :raises StoreUnusableError: this install cannot read a ledger at all (no ``store``
            extra, or the environment's store settings break a rule): waiting would not help.
        """
        try:
            from sqlalchemy.exc import SQLAlchemyError
        except ModuleNotFoundError as exc:
            raise StoreUnusableError(
                "confirming batches through the database's ledger needs the 'store' extra "
                "(pip install '.[store]' in agent-sessions' checkout); on a Redis broker the "
                "workers' marks confirm without it"
            ) from exc
        try:
            store = self._store or self._open()
            wanted = list(batch_ids)
            found: set[uuid.UUID] = set()
            for start in range(0, len(wanted), LEDGER_QUERY_CHUNK):
                found |= store.applied_batch_ids(wanted[start : start + LEDGER_QUERY_CHUNK])
            return found
        except SQLAlchemyError as exc:  # a database that does not answer (yet), or refuses
            raise StoreUnavailableError(str(exc)) from exc

    def _open(self) -> SessionStore:
        from sessions.database import missing_sqlite_file

        missing = missing_sqlite_file(self.settings.database_url)
        if missing is not None:  # no worker has made it yet; connecting would, empty
            raise StoreUnavailableError(f"no database file at {missing} yet")
        from pydantic import ValidationError

        from sessions.settings import describe_settings_error, full_settings
        from sessions.store import SessionStore

        try:
            settings = full_settings(self.settings)
        except ValidationError as exc:  # the store's own settings, from this environment
            raise StoreUnusableError(
                f"cannot open {self.where}: {describe_settings_error(exc)}"
            ) from None
        # Made outside the lock (it takes 100 ms and more with the driver's imports): nothing
        # else waits for it. Several threads may flush at once; one store (one pool) for all.
        made: SessionStore | None = SessionStore(
            self.settings.database_url, settings=settings, read_only=True
        )
        with self._lock:
            if self._store is None:
                self._store, made = made, None
            store = self._store
        if made is not None:
            made.dispose()
        assert store is not None
        return store

    def close(self) -> None:
        if self._owns_store and self._store is not None:
            self._store.dispose()

    def after_fork(self) -> None:
        if self._store is not None:
            self._store.engine.dispose(close=False)
        self._lock = threading.Lock()


def confirmer_for(settings: ClientSettings, store: SessionStore | None = None) -> Confirmer:
    """The confirmer ``settings`` ask for: the workers' marks on a Redis broker (``confirmer``
    ``redis``, or ``auto`` on a Redis broker), else the ledger; the ledger of ``store`` when
    one is given."""
    if store is None and settings.confirms_on_redis:
        from sessions.redis_confirming import RedisConfirmer

        return RedisConfirmer(settings)
    return LedgerConfirmer(settings, store)


class Confirmations:
    """The batches a tracker waits to see applied, and the thread that looks.

    Published batches are kept in an :class:`~sessions.outbox.Outbox` (with their text, while
    republishing is on); batches a full buffer spilled to the spool are watched by id only
    (``flush(wait=True)`` waits for them, whoever replays them). Every :data:`CONFIRM_POLL_INTERVAL`
    the thread asks the confirmer about those published :data:`CONFIRM_MIN_AGE` ago, and calls
    ``on_due`` when some are due to be published again (:meth:`take_due`).

    ``settings`` give the confirm timeout (0: no thread, no text kept) and the spool's maximum
    age (no copy of a batch older than that).
    """

    def __init__(
        self, settings: ClientSettings, confirmer: Confirmer, on_due: Callable[[], None]
    ) -> None:
        self.confirmer = confirmer
        self._on_due = on_due
        self._lock = threading.Lock()
        self._outbox = Outbox(
            settings.confirm_timeout_seconds,
            MAX_UNCONFIRMED_BATCHES,
            MAX_UNCONFIRMED_BYTES,
            max_age=settings.spool_max_age.total_seconds(),
        )
        #: Batches the tracker spilled, not yet seen applied: id -> ``seq`` of their last event.
        self._spilled: dict[uuid.UUID, int] = {}
        #: Outbox entries the latest look found missing (candidates to republish).
        self._missing: set[uuid.UUID] = set()
        self._failing = False
        #: Whether the confirmer has answered a look yet.
        self._answered = False
        self._unverified_warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def republishing(self) -> bool:
        return self._outbox.republishing

    def start(self, name: str) -> None:
        """Start the confirming thread (only when republishing is on)."""
        if self.republishing:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    @property
    def looking(self) -> bool:
        """Whether the confirming thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(CONFIRM_POLL_INTERVAL):
            self.check()

    # -- what is watched --------------------------------------------------------------------

    def keep(
        self,
        batch_id: uuid.UUID,
        seq: int | None,
        message: str,
        events: int,
        first_published: float | None = None,
    ) -> None:
        """Hold a batch just published until it is confirmed. ``seq`` is its last event's, or
        ``None`` for a batch replayed from the spool (then the ``seq`` it was spilled at, if
        this tracker spilled it, else 0: recorded before any of this run's events);
        ``first_published`` (a ``time.time()``) dates one an earlier run published."""
        now = time.monotonic()
        with self._lock:
            if seq is None:
                seq = self._spilled.pop(batch_id, 0)
            entry = Unconfirmed(batch_id, seq, message, events, len(message), now)
            if first_published is not None:
                entry.first_published_at = now - max(0.0, time.time() - first_published)
            evicted = self._outbox.add(entry)
            warn = bool(evicted) and not self._unverified_warned
            self._unverified_warned = self._unverified_warned or warn
        if warn:
            log.warning(
                "more than %d published batches (or %d MB) are waiting for %s; the oldest are "
                "no longer kept for republishing (counted in stats.batches_unverified)",
                self._outbox.max_batches,
                self._outbox.max_bytes // (1024 * 1024),
                self.confirmer.where,
            )

    def spilled(self, batch_id: uuid.UUID, seq: int) -> None:
        """Watch a batch spilled to the spool (its last event's ``seq``)."""
        with self._lock:
            self._spilled[batch_id] = seq
            while len(self._spilled) > MAX_UNCONFIRMED_BATCHES:  # forgotten: not waited for
                del self._spilled[next(iter(self._spilled))]

    def forget_spilled(self, batch_id: uuid.UUID) -> None:
        """A batch meant for the spool did not get there: nothing to wait for."""
        with self._lock:
            self._spilled.pop(batch_id, None)

    def _confirm(self, applied: Collection[uuid.UUID]) -> None:
        """``applied`` need nothing more (call under the lock)."""
        self._outbox.confirm(applied)
        for batch_id in applied:
            self._spilled.pop(batch_id, None)

    def drop(self, batch_id: uuid.UUID) -> None:
        """Stop watching one batch (one that can never be published again)."""
        with self._lock:
            self._outbox.confirm({batch_id})

    def take_due(self, limit: int) -> list[Unconfirmed]:
        """At most ``limit`` batches the latest look found missing past their confirm timeout
        (and overtaken: see :meth:`Outbox.overdue`), each taken once per look."""
        with self._lock:
            due = self._outbox.overdue(self._missing, time.monotonic())[:limit]
            self._missing.difference_update(entry.batch_id for entry in due)
        return due

    def republished(self, entry: Unconfirmed) -> None:
        """``entry`` went out again just now: its next wait is twice as long."""
        with self._lock:
            self._outbox.republished(entry, time.monotonic())

    def unconfirmed(self) -> list[Unconfirmed]:
        """The published batches not yet confirmed, oldest first (a snapshot)."""
        with self._lock:
            return self._outbox.entries()

    def counts(self) -> tuple[int, int]:
        """Batches unconfirmed, and forgotten unconfirmed (``batches_unverified``)."""
        with self._lock:
            return len(self._outbox), self._outbox.forgotten

    # -- looking ----------------------------------------------------------------------------

    def check(self, min_age: float = CONFIRM_MIN_AGE) -> None:
        """Drop the batches (published ``min_age`` ago) the confirmer says are applied; note
        the missing ones, calling ``on_due`` when some are due to be published again."""
        with self._lock:
            asked = self._outbox.published_before(time.monotonic() - min_age)
            # Spilled batches too: another tracker sharing the spool may have replayed them.
            asked += self._spilled
        if not asked:
            return
        try:
            applied = self.confirmer.applied(asked)
        except Exception as exc:  # confirming is best effort, never fatal to the agent
            if not self._failing:
                log.warning(
                    "cannot read %s to confirm published batches (%s); they are kept and not "
                    "republished until it answers",
                    self.confirmer.where,
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("%s answers again", self.confirmer.where)
        self._failing = False
        self._answered = True
        with self._lock:
            self._confirm(applied)
            self._missing = set(asked) - applied
            due = bool(self._outbox.overdue(self._missing, time.monotonic()))
        if due:
            self._on_due()

    def wait_applied(self, target: int, deadline: float, timeout: float) -> None:
        """Return once every batch holding events up to ``target`` is confirmed.

        :raises FlushTimeoutError: not by ``deadline`` (a ``time.monotonic()``; ``timeout``
            is the seconds it stands for, to say so).
        """
        with self._lock:
            pending = self._outbox.ids_up_to(target)
            pending.update(b for b, seq in self._spilled.items() if seq <= target)
        last_error: Exception | None = None
        while pending:
            try:
                applied = self.confirmer.applied(pending)
            except (StoreUnavailableError, BrokerUnavailableError) as exc:
                applied, last_error = set(), exc
            if applied:
                pending -= applied
                with self._lock:
                    self._confirm(applied)
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cause = f"; last error: {last_error}" if last_error else ""
                raise FlushTimeoutError(
                    f"{len(pending)} batches were not applied within {timeout:g} s "
                    f"(not in {self.confirmer.where}){cause}"
                )
            time.sleep(min(FLUSH_POLL_INTERVAL, remaining))

    def unconfirmed_at_close(self, deadline: float) -> list[Unconfirmed]:
        """At close: the batches still not confirmed after a short wait for the last ones, to
        be kept in the spool for the next process to publish again.

        None when republishing is off, or when the confirmer has not answered: without it
        nothing tells a lost batch from an applied one, and the spool would fill with copies
        (crowding out unsent batches).
        """
        if not self.republishing or not self.counts()[0]:
            return []
        if self.looking:
            return []  # still stuck in a look: the confirmer is not answering
        wait_until = min(deadline, time.monotonic() + CLOSE_CONFIRM_WAIT)
        while True:
            self.check(min_age=-1.0)
            if self._failing or not self._answered:
                log.warning(
                    "closing with %d published batches %s could not confirm; they are not "
                    "kept for republishing",
                    self.counts()[0],
                    self.confirmer.where,
                )
                return []
            if not self.counts()[0] or time.monotonic() >= wait_until:
                break
            time.sleep(FLUSH_POLL_INTERVAL)
        with self._lock:
            return self._outbox.drain()


def message_text(message: str | dict[str, Any]) -> str:
    """A kept message as the text a publisher takes."""
    return message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))
