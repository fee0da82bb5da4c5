"""The guide's API, so its examples run with ``from sessions import ContextEngine``.

Writes go through the queue (a :class:`~sessions.tracker.SessionTracker`), so
``update_session`` costs the caller microseconds. Reads go to the database, and first wait
(with a deadline) until every write this engine made is applied: a read through one engine
always sees that engine's own writes.

The guide compares ``session.created_at`` with ``datetime.utcnow()``, a *naive* UTC datetime,
so :class:`GuideSession` carries naive UTC datetimes. Everything else in this package is
timezone-aware; :meth:`GuideSession.record` gives the aware read model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sessions.bounds import check_id, check_seconds
from sessions.errors import SessionLimitError
from sessions.queries import session_filter
from sessions.records import SessionRecord
from sessions.settings import Settings, get_settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class GuideSession:
    """A session as the guide's code sees it (naive UTC datetimes, guide field names)."""

    session_id: str
    user_id: str | None
    status: str
    request_count: int
    error_count: int
    total_processing_time: float
    created_at: datetime
    last_activity: datetime
    ended_at: datetime | None
    metadata: dict[str, Any] | None
    record: SessionRecord

    @classmethod
    def from_record(cls, record: SessionRecord) -> GuideSession:
        created_at = _naive_utc(record.created_at)
        last_activity = _naive_utc(record.last_activity)
        assert created_at is not None and last_activity is not None
        return cls(
            session_id=record.session_id,
            user_id=record.user_id,
            status=record.status,
            request_count=record.request_count,
            error_count=record.error_count,
            total_processing_time=record.total_processing_time,
            created_at=created_at,
            last_activity=last_activity,
            ended_at=_naive_utc(record.ended_at),
            metadata=record.metadata,
            record=record,
        )

    @property
    def error_rate(self) -> float:
        return self.record.error_rate

    @property
    def average_processing_time(self) -> float:
        return self.record.average_processing_time

    def is_expired(self, max_idle_seconds: float = 1800) -> bool:
        """Whether to replace this session: ended, or active and idle too long.

        Asks the one rule, :meth:`sessions.records.SessionRecord.is_expired`: ``True`` for a
        ``completed``, ``failed`` or ``expired`` session, and for an ``active`` one idle for
        longer than ``max_idle_seconds``.

        :raises ValueError: ``max_idle_seconds`` is negative or not a finite number.
        """
        return self.record.is_expired(max_idle_seconds)


class ContextEngine:
    """The guide's ``context_engine``: async session calls over the queue and the store."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        tracker: SessionTracker | None = None,
        store: SessionStore | None = None,
        read_timeout: float = 30.0,
    ) -> None:
        self.settings = settings or get_settings()
        self._tracker = tracker
        self._store = store
        #: Longest a read waits for this engine's own writes to be applied.
        self.read_timeout = read_timeout

    async def initialize(self) -> None:
        """Open the store (migrating an empty database) and start the tracker."""
        if self._store is None:
            self._store = SessionStore(self.settings.database_url, settings=self.settings)
        await asyncio.to_thread(self._store.upgrade)
        if self._tracker is None:
            self._tracker = SessionTracker(self.settings)

    async def close(self) -> None:
        if self._tracker is not None:
            await asyncio.to_thread(self._tracker.close)
        if self._store is not None:
            self._store.dispose()

    async def __aenter__(self) -> ContextEngine:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            raise RuntimeError("ContextEngine used before `await initialize()`")
        return self._store

    @property
    def tracker(self) -> SessionTracker:
        if self._tracker is None:
            raise RuntimeError("ContextEngine used before `await initialize()`")
        return self._tracker

    async def _read_own_writes(self) -> None:
        await asyncio.to_thread(self.tracker.flush, wait=True, timeout=self.read_timeout)

    # -- writes --------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> GuideSession:
        """Create a session, or a new run of an ended or idle-expired one.

        What the guide's pool and timeout patterns call once ``is_expired()`` is true. A
        ``completed``, ``failed`` or ``expired`` session starts a new run (its ended run is
        kept as a past run); an ``active`` one idle for longer than
        ``SESSIONS_MAX_IDLE_SECONDS`` is expired first by the idle sweep's rule, as if beat
        had reached it, then starts one too. An ``active`` session that is not idle goes on
        (the create only fills a missing ``user_id`` or ``metadata``): a pool with a shorter
        threshold than the idle sweep's does not cut a run the sweep would keep.

        With ``SESSIONS_MAX_ACTIVE_SESSIONS`` set, a full system first reclaims sessions idle
        for 15 minutes and then raises :class:`SessionLimitError`, as the guide does. A
        ``session_id`` that is not a ``str`` raises ``TypeError``, one that breaks the id rule
        ``ValueError``.
        """
        check_id("session_id", session_id)  # before any wait
        await self._read_own_writes()
        current = await asyncio.to_thread(self.store.get, session_id)
        limit = self.settings.max_active_sessions
        if limit is not None and (current is None or current.status != "active"):
            await asyncio.to_thread(self._ensure_capacity, session_id, limit)
        max_idle = self.settings.max_idle_seconds
        if current is not None and current.status == "active" and current.is_expired(max_idle):
            # The guide's pool re-creates an idle session: the idle sweep's rule ends the idle
            # run (``expired``, reason ``idle``, at its last activity + max idle) exactly as if
            # beat had reached it first, so the create starts a fresh run in either order.
            await asyncio.to_thread(self.store.expire_idle, max_idle, session_id=session_id)
        self.tracker.create(session_id, user_id=user_id, metadata=metadata)
        session = await self.get_session(session_id)
        assert session is not None
        return session

    def _ensure_capacity(self, session_id: str, limit: int) -> None:
        if self.store.count_active() < limit:
            return
        self.store.expire_idle(self.settings.session_limit_idle_seconds)
        if self.store.count_active() >= limit:
            raise SessionLimitError(
                f"maximum of {limit} active sessions reached; cannot create {session_id!r}"
            )

    async def update_session(
        self,
        session_id: str,
        increment_requests: bool = False,
        add_processing_time: float = 0.0,
        mark_error: bool = False,
    ) -> None:
        """Record metrics for a session (created on first use, as the guide's agents expect)."""
        self.tracker.record(
            session_id,
            processing_time=add_processing_time,
            error=mark_error,
            counts_request=increment_requests,
        )

    async def end_session(self, session_id: str, status: str = "completed") -> None:
        """End the session's current run as ``completed``, ``failed`` or ``expired``."""
        self.tracker.end(session_id, status=status)

    async def cleanup_inactive_sessions(self, max_idle_seconds: float = 1800) -> int:
        """Expire sessions idle longer than ``max_idle_seconds``; returns how many.

        :raises ValueError: ``max_idle_seconds`` is not above 0 and at most 100 years
            (``SESSIONS_MAX_IDLE_SECONDS``' bounds); ``TypeError`` if it is not a number.
        """
        check_seconds("max_idle_seconds", max_idle_seconds)  # before any wait
        await self._read_own_writes()
        result = await asyncio.to_thread(self.store.expire_idle, max_idle_seconds)
        return result.count

    # -- reads ---------------------------------------------------------------------------

    async def get_session(self, session_id: str) -> GuideSession | None:
        """The session's current run; ``None`` for a session never heard of.

        :raises TypeError: ``session_id`` is not a ``str``.
        :raises ValueError: it breaks the id rule (1 to 255 printable ASCII characters).
        """
        check_id("session_id", session_id)  # before any wait
        await self._read_own_writes()
        record = await asyncio.to_thread(self.store.get, session_id)
        return None if record is None else GuideSession.from_record(record)

    async def list_sessions(
        self, user_id: str | None = None, status: str | None = None
    ) -> list[GuideSession]:
        """Every matching session (paged from the database by id).

        :raises ValueError: ``status`` is not ``active``, ``completed``, ``failed`` or
            ``expired``, or ``user_id`` breaks the id rule (``TypeError``: not a ``str``).
        """
        session_filter(user_id, status)  # checks them, before any wait
        await self._read_own_writes()
        records = await asyncio.to_thread(
            lambda: list(self.store.iter_sessions(user_id=user_id, status=status))
        )
        return [GuideSession.from_record(record) for record in records]
