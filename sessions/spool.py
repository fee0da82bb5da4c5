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

The tracker also spills here: when a burst of ``record`` calls outruns its publisher and the
in-memory buffer is full, whole batches are written as their wire text
(:meth:`BatchSpool.put_texts`, several in one statement) and replayed like unsent ones.

A batch no replay could ever publish (its text is not UTF-8, not JSON, or not the text of
its batch, after damage to the file or a bug; or the publisher refused to serialise it) is
never retried: it is moved to the table ``quarantined_batches`` of the same file with its
reason, logged at ERROR and counted (:attr:`SpoolStats.quarantined_batches`), and the batches
behind it go out. Quarantined batches are kept for the spool's maximum age, for an operator
to read (``sqlite3 <spool file> "SELECT batch_id, reason FROM quarantined_batches"``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sessions.plain import peek_batch_id

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger(__name__)

#: File name of a spool inside ``SESSIONS_SPOOL_DIR``; ``{key}`` tells brokers apart.
SPOOL_FILE = "spool-{key}.sqlite3"
#: Seconds a spool connection waits for another process's write.
BUSY_TIMEOUT = 10.0
#: Rows per ``INSERT`` of :meth:`BatchSpool.put_texts` (5 parameters each: within the 999
#: parameters of a statement that older SQLite builds allow).
ROWS_PER_INSERT = 100
#: Batch ids per ``IN`` list of :meth:`BatchSpool.holding`.
HOLDING_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled_batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL UNIQUE,
    message TEXT NOT NULL,
    size INTEGER NOT NULL,
    spooled_at REAL NOT NULL,
    events INTEGER,
    claimed_until REAL NOT NULL DEFAULT 0
)
"""
_QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantined_batches (
    seq INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL,
    message BLOB NOT NULL,
    spooled_at REAL NOT NULL,
    quarantined_at REAL NOT NULL,
    reason TEXT NOT NULL
)
"""
#: Columns added since the first spool files (``events`` ``NULL``: counted from the text).
_ADDED_COLUMNS = {
    "events": "ALTER TABLE spooled_batches ADD COLUMN events INTEGER",
    "claimed_until": "ALTER TABLE spooled_batches ADD COLUMN claimed_until REAL NOT NULL DEFAULT 0",
}
_COLUMNS = "(batch_id, message, size, spooled_at, events)"
#: What a replay reads of a row: its text as bytes (a text that is not UTF-8 must not fail the
#: read of the rows around it), whether SQLite's JSON parser takes it (in C, without the GIL),
#: and its events, counted from the text for rows of older files that do not say.
_RETURNED = (
    "seq, batch_id, CAST(message AS BLOB), spooled_at,"
    " coalesce(events, CASE WHEN json_valid(message)"
    " THEN json_array_length(message, '$.events') END),"
    " json_valid(message)"
)


@dataclass(frozen=True)
class SpooledBatch:
    """One batch waiting in the spool: its position, id, wire text and events."""

    seq: int
    batch_id: str
    #: The batch's JSON text, as published (a batch message, :meth:`Batch.to_message`).
    text: str
    spooled_at: float
    events: int

    @cached_property
    def message(self) -> dict[str, Any]:
        """The batch message the text holds."""
        decoded: dict[str, Any] = json.loads(self.text)
        return decoded


@dataclass(frozen=True)
class QuarantinedBatch:
    """A spooled batch set aside because it can never be published, and why."""

    batch_id: str
    #: Its text as stored (damaged bytes shown with replacement characters).
    text: str
    spooled_at: float
    quarantined_at: float
    reason: str


@dataclass(frozen=True)
class SpillItem:
    """One batch to keep: its id, wire text and number of events."""

    batch_id: str
    text: str
    events: int
    #: A ``time.time()`` dating a batch published before (see :meth:`BatchSpool.put`).
    since: float | None = None


@dataclass(frozen=True)
class SpoolStats:
    batches: int
    #: Events in the waiting batches (``None`` where a batch from an older spool file does not
    #: say, counted as 0 here).
    events: int
    bytes: int
    #: Batches refused because the spool was full (since this object was opened).
    overflowed_batches: int
    overflowed_events: int
    #: Batches dropped because they waited longer than the spool's maximum age.
    expired_batches: int
    #: Batches in ``quarantined_batches``: set aside, never to be replayed (see the module).
    quarantined_batches: int = 0


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
            # Imported here: an agent that never spools never loads SQLite (~3 ms at start).
            import sqlite3

            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(_SCHEMA)
            connection.execute(_QUARANTINE_SCHEMA)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(spooled_batches)")}
            for column, statement in _ADDED_COLUMNS.items():
                if column not in columns:
                    try:
                        connection.execute(statement)
                    except sqlite3.OperationalError as exc:  # another process added it first
                        if "duplicate column" not in str(exc):
                            raise
            self._opened = connection
        return self._opened

    def _never_written(self) -> bool:
        """Whether the spool's file does not exist yet: then it is empty, and a read (an
        agent's look for earlier runs' batches, before its first publish) need not create it,
        which costs opening SQLite and making the schema (about 2 ms) on the way to the first
        message, nor leave a file behind for every agent that never spools."""
        return self._opened is None and not self.path.exists()

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
        item = SpillItem(
            str(message["batch_id"]),
            json.dumps(message, separators=(",", ":")),
            len(message.get("events", ())),
        )
        return self.put_texts([item], since=since) == 1

    def put_texts(self, items: Sequence[SpillItem], *, since: float | None = None) -> int:
        """Keep the batches ``items`` (oldest first) in one transaction; how many were kept.

        ``since`` dates them all as :meth:`put` does, unless an item has its own.

        As many as fit, in order; the rest are refused (counted, and logged at ERROR).
        All rows go in one ``INSERT``: every SQLite call releases the GIL, and a thread that
        gives it up while another spins in ``record`` waits a switch interval to get it back.
        """
        if not items:
            return 0
        sizes = [len(item.text.encode()) for item in items]
        with self._transaction() as connection:
            count, used = connection.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM spooled_batches"
            ).fetchone()
            kept = 0
            room_batches, room_bytes = self.max_batches - count, self.max_bytes - used
            while kept < len(items) and kept < room_batches and sizes[kept] <= room_bytes:
                room_bytes -= sizes[kept]
                kept += 1
            at = since or time.time()
            keeping = list(zip(items[:kept], sizes, strict=False))
            for start in range(0, kept, ROWS_PER_INSERT):
                chunk = keeping[start : start + ROWS_PER_INSERT]
                rows = [
                    value
                    for item, size in chunk
                    for value in (item.batch_id, item.text, size, item.since or at, item.events)
                ]
                placeholders = ",".join(["(?, ?, ?, ?, ?)"] * len(chunk))
                connection.execute(
                    f"INSERT OR IGNORE INTO spooled_batches {_COLUMNS} VALUES {placeholders}",
                    rows,
                )
        refused = items[kept:]
        if refused:
            self._overflowed_batches += len(refused)
            self._overflowed_events += sum(item.events for item in refused)
            log.error(
                "session spool %s is full (%d batches, %d bytes): %d batches (first %s) with "
                "%d events NOT kept; %d batches refused so far",
                self.path,
                count + kept,
                used + sum(sizes[:kept]),
                len(refused),
                refused[0].batch_id,
                sum(item.events for item in refused),
                self._overflowed_batches,
            )
        return kept

    def oldest(self, limit: int = 100) -> list[SpooledBatch]:
        """Up to ``limit`` batches in the order they were spooled, dropping expired ones
        (and quarantining those that cannot be published, see the module)."""
        if self._never_written():
            return []
        self._drop_expired()
        with self._transaction() as connection:
            rows = connection.execute(
                f"SELECT {_RETURNED} FROM spooled_batches ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            return self._readable(connection, rows)

    def claim(self, limit: int, seconds: float) -> list[SpooledBatch]:
        """Up to ``limit`` of the oldest batches no other process is replaying, claimed for
        ``seconds``: every agent on the machine shares the spool, and without a claim two
        replaying at once would publish every batch twice (harmless, thanks to the ledger,
        but twice the work). A claim that was not :meth:`released <release>` (the process
        died replaying) runs out, and the batches are anyone's again."""
        if self._never_written():
            return []
        self._drop_expired()
        now = time.time()
        with self._transaction() as connection:
            # ``RETURNING`` needs SQLite 3.35 (2021); Python 3.11's builds bundle newer ones.
            rows = connection.execute(
                "UPDATE spooled_batches SET claimed_until = ? WHERE seq IN ("
                " SELECT seq FROM spooled_batches WHERE claimed_until <= ? ORDER BY seq LIMIT ?"
                f") RETURNING {_RETURNED}",
                (now + seconds, now, limit),
            ).fetchall()
            return self._readable(connection, sorted(rows))

    def quarantine(self, seq: int, reason: str) -> None:
        """Set the batch ``seq`` aside for good, with ``reason``: it can never be published
        (the publisher could not serialise it, say), and must not hold up the ones behind it."""
        with self._transaction() as connection:
            self._quarantine(connection, [(seq, reason)])

    def quarantined(self, limit: int = 100) -> list[QuarantinedBatch]:
        """The batches set aside, newest first (what an operator looks at)."""
        if self._never_written():
            return []
        with self._lock:
            rows = self._connection.execute(
                "SELECT batch_id, message, spooled_at, quarantined_at, reason"
                " FROM quarantined_batches ORDER BY quarantined_at DESC, seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            QuarantinedBatch(batch_id, bytes(text).decode("utf-8", "replace"), at, moved, reason)
            for batch_id, text, at, moved, reason in rows
        ]

    def _readable(
        self, connection: sqlite3.Connection, rows: list[tuple[Any, ...]]
    ) -> list[SpooledBatch]:
        """The batches of ``rows`` that can be published; the others are quarantined, in the
        caller's transaction (call with ``_lock`` held)."""
        readable: list[SpooledBatch] = []
        unreadable: list[tuple[int, str]] = []
        for seq, batch_id, data, spooled_at, events, valid_json in rows:
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as exc:
                unreadable.append((seq, f"its text is not UTF-8 text ({exc})"))
                continue
            if not valid_json or events is None:
                unreadable.append((seq, "its text is not a JSON document of a batch of events"))
            elif peek_batch_id(text) != batch_id:
                unreadable.append((seq, f"its text is not the text of batch {batch_id}"))
            else:
                readable.append(SpooledBatch(seq, batch_id, text, spooled_at, events))
        self._quarantine(connection, unreadable)
        return readable

    def _quarantine(self, connection: sqlite3.Connection, rows: Sequence[tuple[int, str]]) -> None:
        """Move ``(seq, reason)`` rows to ``quarantined_batches`` (in the caller's transaction)."""
        for seq, reason in rows:
            moved = connection.execute(
                "INSERT INTO quarantined_batches"
                " (seq, batch_id, message, spooled_at, quarantined_at, reason)"
                " SELECT seq, batch_id, CAST(message AS BLOB), spooled_at, ?, ?"
                " FROM spooled_batches WHERE seq = ? RETURNING batch_id",
                (time.time(), reason, seq),
            ).fetchone()
            connection.execute("DELETE FROM spooled_batches WHERE seq = ?", (seq,))
            if moved is not None:
                log.error(
                    "spooled batch %s can never be published: %s; moved it to the table "
                    "quarantined_batches of %s (kept %.0f days for inspection, never replayed)",
                    moved[0],
                    reason,
                    self.path,
                    self.max_age_seconds / 86_400,
                )

    def release(self, *seqs: int) -> None:
        """Give claimed batches back (they could not be published now)."""
        if not seqs:
            return
        with self._transaction() as connection:
            connection.execute(
                "UPDATE spooled_batches SET claimed_until = 0"
                f" WHERE seq IN ({','.join('?' * len(seqs))})",
                seqs,
            )

    def remove(self, *seqs: int) -> None:
        """Forget batches (by their ``seq``) once they have been published."""
        if not seqs:
            return
        with self._transaction() as connection:
            connection.execute(
                f"DELETE FROM spooled_batches WHERE seq IN ({','.join('?' * len(seqs))})", seqs
            )

    def holding(self, batch_ids: Collection[str]) -> set[str]:
        """Which of ``batch_ids`` the spool holds now (waiting, claimed or not)."""
        if not batch_ids or self._never_written():
            return set()
        ids = list(batch_ids)
        held: set[str] = set()
        with self._lock:
            for start in range(0, len(ids), HOLDING_CHUNK):
                chunk = ids[start : start + HOLDING_CHUNK]
                rows = self._connection.execute(
                    "SELECT batch_id FROM spooled_batches"
                    f" WHERE batch_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                held.update(row[0] for row in rows)
        return held

    def __len__(self) -> int:
        if self._never_written():
            return 0
        with self._lock:
            return int(
                self._connection.execute("SELECT count(*) FROM spooled_batches").fetchone()[0]
            )

    def stats(self) -> SpoolStats:
        if self._never_written():
            batches = events = used = quarantined = 0
        else:
            batches, events, used, quarantined = self._counts()
        return SpoolStats(
            batches=batches,
            events=events,
            bytes=used,
            overflowed_batches=self._overflowed_batches,
            overflowed_events=self._overflowed_events,
            expired_batches=self._expired_batches,
            quarantined_batches=quarantined,
        )

    def _counts(self) -> tuple[int, int, int, int]:
        """Batches, events, bytes waiting, and batches quarantined."""
        with self._lock:
            batches, events, used = self._connection.execute(
                "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(size), 0)"
                " FROM spooled_batches"
            ).fetchone()
            (quarantined,) = self._connection.execute(
                "SELECT count(*) FROM quarantined_batches"
            ).fetchone()
        return int(batches), int(events), int(used), int(quarantined)

    def _drop_expired(self) -> None:
        cutoff = time.time() - self.max_age_seconds
        with self._lock:
            first, set_aside = self._connection.execute(
                "SELECT (SELECT min(spooled_at) FROM spooled_batches),"
                " (SELECT min(quarantined_at) FROM quarantined_batches)"
            ).fetchone()
        if set_aside is not None and set_aside < cutoff:
            with self._transaction() as connection:
                connection.execute(
                    "DELETE FROM quarantined_batches WHERE quarantined_at < ?", (cutoff,)
                )
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
