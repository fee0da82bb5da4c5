"""A durable, bounded, local queue of batches the client could not publish.

When the broker cannot be reached, :class:`~sessions.tracker.SessionTracker` writes each
unsent batch here, whole and with its ``batch_id``, and replays the spool oldest first once
the broker answers again (also after the agent restarts). The ledger makes a replayed batch
count once even if its first publish did reach the broker.

The spool is one SQLite file per broker (WAL, so several agent processes on a machine can
share it; keyed by the broker's URL, so a batch is only ever replayed to the broker it was
meant for):
a batch is stored in one transaction and removed only after it was published, so a crash
in between costs a redundant replay, never an event. When the spool is full the *oldest*
data is kept and the new batch is refused, counted, and logged at ERROR: an agent that has
been cut off that long is told loudly, and nothing vanishes silently.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: File name of a spool inside ``SESSIONS_SPOOL_DIR``; ``{key}`` tells brokers apart.
SPOOL_FILE = "spool-{key}.sqlite3"
#: Seconds a spool connection waits for another process's write.
BUSY_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled_batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL UNIQUE,
    message TEXT NOT NULL,
    size INTEGER NOT NULL,
    spooled_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class SpooledBatch:
    """One batch waiting in the spool: its position, id and wire message."""

    seq: int
    batch_id: str
    message: dict[str, Any]
    spooled_at: float


@dataclass(frozen=True)
class SpoolStats:
    batches: int
    bytes: int
    #: Batches refused because the spool was full (since this object was opened).
    overflowed_batches: int
    overflowed_events: int
    #: Batches dropped because they waited longer than the spool's maximum age.
    expired_batches: int


class BatchSpool:
    """Unsent batches on disk, bounded by count, bytes and age."""

    def __init__(
        self,
        directory: Path,
        *,
        key: str = "default",
        max_batches: int,
        max_bytes: int,
        max_age_seconds: float,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.key = directory, key
        self.path = directory / SPOOL_FILE.format(key=key)
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        self._opened: sqlite3.Connection | None = None
        self._overflowed_batches = 0
        self._overflowed_events = 0
        self._expired_batches = 0

    @property
    def _connection(self) -> sqlite3.Connection:
        """The file, opened on first use (call with ``_lock`` held).

        Lazily, so that a forked child which never needs its spool never touches SQLite:
        a library lock held by another thread at the fork would hang it.
        """
        if self._opened is None:
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(_SCHEMA)
            self._opened = connection
        return self._opened

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def put(self, message: dict[str, Any], *, since: float | None = None) -> bool:
        """Keep ``message`` until it can be published; ``False`` (and an ERROR) when full.

        ``since`` (a ``time.time()``) dates a batch that was published before, unconfirmed:
        its age, and so its expiry, count from its first publish, not from now.
        """
        text = json.dumps(message, separators=(",", ":"))
        size = len(text.encode())
        with self._transaction() as connection:
            count, used = connection.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM spooled_batches"
            ).fetchone()
            if count >= self.max_batches or used + size > self.max_bytes:
                self._overflowed_batches += 1
                self._overflowed_events += len(message.get("events", ()))
                full = True
            else:
                connection.execute(
                    "INSERT OR IGNORE INTO spooled_batches (batch_id, message, size, spooled_at)"
                    " VALUES (?, ?, ?, ?)",
                    (str(message["batch_id"]), text, size, since or time.time()),
                )
                full = False
        if full:
            log.error(
                "session spool %s is full (%d batches, %d bytes): batch %s with %d events "
                "NOT kept; %d batches refused so far",
                self.path,
                count,
                used,
                message["batch_id"],
                len(message.get("events", ())),
                self._overflowed_batches,
            )
        return not full

    def oldest(self, limit: int = 100) -> list[SpooledBatch]:
        """Up to ``limit`` batches in the order they were spooled, dropping expired ones."""
        self._drop_expired()
        with self._lock:
            rows = self._connection.execute(
                "SELECT seq, batch_id, message, spooled_at FROM spooled_batches"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            SpooledBatch(seq, batch_id, json.loads(text), at) for seq, batch_id, text, at in rows
        ]

    def remove(self, seq: int) -> None:
        """Forget a batch once it has been published."""
        with self._transaction() as connection:
            connection.execute("DELETE FROM spooled_batches WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            return int(
                self._connection.execute("SELECT count(*) FROM spooled_batches").fetchone()[0]
            )

    def stats(self) -> SpoolStats:
        with self._lock:
            batches, used = self._connection.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM spooled_batches"
            ).fetchone()
        return SpoolStats(
            batches=batches,
            bytes=used,
            overflowed_batches=self._overflowed_batches,
            overflowed_events=self._overflowed_events,
            expired_batches=self._expired_batches,
        )

    def _drop_expired(self) -> None:
        cutoff = time.time() - self.max_age_seconds
        with self._lock:
            oldest = self._connection.execute("SELECT min(spooled_at) FROM spooled_batches")
            first = oldest.fetchone()[0]
        if first is None or first >= cutoff:
            return
        with self._transaction() as connection:
            expired = connection.execute(
                "DELETE FROM spooled_batches WHERE spooled_at < ? RETURNING batch_id", (cutoff,)
            ).fetchall()
        if expired:
            self._expired_batches += len(expired)
            log.error(
                "dropped %d batches that waited in %s longer than %.0f s (spool_max_age_days): "
                "the broker was unreachable for too long; their events are lost",
                len(expired),
                self.path,
                self.max_age_seconds,
            )

    def reopen_after_fork(self) -> BatchSpool:
        """The same spool for a forked child: SQLite connections must not cross a fork."""
        return BatchSpool(
            self.directory,
            key=self.key,
            max_batches=self.max_batches,
            max_bytes=self.max_bytes,
            max_age_seconds=self.max_age_seconds,
        )

    def close(self) -> None:
        with self._lock:
            if self._opened is not None:
                self._opened.close()
                self._opened = None
