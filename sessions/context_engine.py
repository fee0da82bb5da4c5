"""The guide's API, so its examples run with ``from sessions import ContextEngine``, and the
calls an unmodified AIECS (aiecs 2.2.0) agent makes on the ``context_engine`` it is given.

Writes go through the queue (a :class:`~sessions.tracker.SessionTracker`), so
``update_session`` and ``add_conversation_message`` cost the caller microseconds, and need
neither the database nor the ``store`` extra (SQLAlchemy is imported by the first read, which
opens the store). Reads go to the database, and first wait (with a deadline) until every
write this engine made is applied: a read through one engine always sees that engine's own
writes. The conversation's history is the exception that never waits
(:mod:`sessions.conversation`), and checkpoints are written to the database directly
(:mod:`sessions.checkpoints`).

The guide compares ``session.created_at`` with ``datetime.utcnow()``, a *naive* UTC datetime,
so :class:`GuideSession` carries naive UTC datetimes. Everything else in this package is
timezone-aware; :meth:`GuideSession.record` gives the aware read model. Sessions and
messages also serve the dict access aiecs's own engine gives (``session["request_count"]``,
``.get``, ``to_dict()``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sessions.bounds import check_hours, check_id, check_limit, check_seconds
from sessions.conversation import Conversation, GuideMessage
from sessions.mapping import MappingAccess
from sessions.records import SessionRecord
from sessions.settings import Settings, get_settings
from sessions.tracker import SessionTracker

if TYPE_CHECKING:
    # Imported where a read first needs it: an agent that only writes never loads SQLAlchemy
    # (tests/unit/test_client_imports.py).
    from sessions.store import SessionStore

#: ``end_session`` statuses aiecs sends that are not this project's: ``cleared`` (aiecs's
#: ``ConversationMemory.clear_conversation_history``) ends the run as ``completed``.
END_STATUS_ALIASES = {"cleared": "completed"}
#: Sessions ended through one engine it remembers, to start a new run on a later write.
MAX_ENDED_REMEMBERED = 10_000


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class GuideSession(MappingAccess):
    """A session as the guide's code sees it (naive UTC datetimes, guide field names), also
    by key as aiecs's engine gives it (``session["request_count"]``, ``to_dict()``)."""

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

    @property
    def processing_time_p50(self) -> float | None:
        return self.record.processing_time_p50

    @property
    def processing_time_p95(self) -> float | None:
        return self.record.processing_time_p95

    @property
    def processing_time_p99(self) -> float | None:
        return self.record.processing_time_p99

    def to_dict(self) -> dict[str, Any]:
        """The session as a dict: aiecs's ``SessionMetrics.to_dict()`` fields (datetimes as ISO
        text of naive UTC, as there), then this project's (run, tokens, cost, rates,
        percentiles)."""
        r = self.record
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "created_at": self.created_at.isoformat(),
            "last_activity": self.last_activity.isoformat(),
            "request_count": self.request_count,
            "error_count": self.error_count,
            "total_processing_time": self.total_processing_time,
            "status": self.status,
            "end_reason": r.end_reason,
            "ended_at": None if self.ended_at is None else self.ended_at.isoformat(),
            "metadata": self.metadata,
            "run": r.run,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "cost": r.cost,
            "error_rate": self.error_rate,
            "average_processing_time": self.average_processing_time,
            "processing_time_p50": r.processing_time_p50,
            "processing_time_p95": r.processing_time_p95,
            "processing_time_p99": r.processing_time_p99,
        }

    def is_expired(self, max_idle_seconds: float = 1800) -> bool:
        """Whether to replace this session: ended, or active and idle too long.

        Asks the one rule, :meth:`sessions.records.SessionRecord.is_expired`: ``True`` for a
        ``completed``, ``failed`` or ``expired`` session, and for an ``active`` one idle for
        longer than ``max_idle_seconds``.

        :raises ValueError: ``max_idle_seconds`` is negative or not a finite number.
        """
        return self.record.is_expired(max_idle_seconds)


class ContextEngine:
    """The guide's ``context_engine``: async session calls over the queue and the store.

    ``infer_requests`` (default on) counts a request for each user question an assistant
    answers in a session's conversation (:mod:`sessions.turns`), which is how an AIECS agent
    gets "every request tracked automatically"; turn it off where the code also calls
    ``update_session(increment_requests=True)`` per task, or each is counted twice.
    """

    #: Read (and set, when missing) by aiecs's memory plugin before it looks for
    #: ``compress_on_append_if_needed``, which this engine does not have: aiecs then skips
    #: compression; a conversation is bounded by ``SESSIONS_CONVERSATION_MAX_MESSAGES``.
    compression_policy: Any = None

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        tracker: SessionTracker | None = None,
        store: SessionStore | None = None,
        read_timeout: float = 30.0,
        infer_requests: bool = True,
    ) -> None:
        self.settings = settings or get_settings()
        self._tracker = tracker
        self._store = store
        #: Whether ``_store`` is migrated (by the first read, whether given or opened here).
        self._store_ready = False
        self._store_lock = threading.Lock()
        self._conversation: Conversation | None = None
        #: Sessions this engine ended and nothing has written since, newest last (bounded): a
        #: write to one starts a new run, as aiecs expects after clearing a conversation.
        self._ended_here: OrderedDict[str, None] = OrderedDict()
        self.infer_requests = infer_requests
        #: Longest a read waits for this engine's own writes to be applied.
        self.read_timeout = read_timeout

    async def initialize(self) -> bool:
        """Start the tracker; ``True`` (aiecs expects a bool).

        The store is not opened here: the first read opens it (``SESSIONS_DATABASE_URL``,
        migrating an empty database) and raises what opening the database raises, so an agent
        that only writes needs no database, no credentials for it and no SQLAlchemy.
        """
        if self._tracker is None:
            self._tracker = SessionTracker(self.settings)
        if self._conversation is None:
            self._conversation = Conversation(
                self._tracker,
                lambda: self.store,
                retention=self.settings.conversation_max_messages,
                infer_requests=self.infer_requests,
            )
        return True

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
        """The store the reads use, opened and migrated on first use (blocking: the async
        reads get it through :meth:`_opened_store`).

        :raises ImportError: SQLAlchemy is missing (install the ``store`` extra).
        :raises sqlalchemy.exc.SQLAlchemyError: the database cannot be opened or migrated.
        """
        with self._store_lock:
            if self._store is None:
                from sessions.store import SessionStore  # the reads' dependency, not the writes'

                self._store = SessionStore(self.settings.database_url, settings=self.settings)
            if not self._store_ready:
                self._store.upgrade()
                self._store_ready = True
            return self._store

    async def _opened_store(self) -> SessionStore:
        return await asyncio.to_thread(lambda: self.store)

    @property
    def tracker(self) -> SessionTracker:
        if self._tracker is None:
            raise RuntimeError("ContextEngine used before `await initialize()`")
        return self._tracker

    @property
    def conversation(self) -> Conversation:
        if self._conversation is None:
            raise RuntimeError("ContextEngine used before `await initialize()`")
        return self._conversation

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
        store = await self._opened_store()
        current = await asyncio.to_thread(store.get, session_id)
        limit = self.settings.max_active_sessions
        if limit is not None and (current is None or current.status != "active"):
            await asyncio.to_thread(store.ensure_capacity, session_id, limit)
        max_idle = self.settings.max_idle_seconds
        if current is not None and current.status == "active" and current.is_expired(max_idle):
            # The guide's pool re-creates an idle session: the idle sweep's rule ends the idle
            # run (``expired``, reason ``idle``, at its last activity + max idle) exactly as if
            # beat had reached it first, so the create starts a fresh run in either order.
            await asyncio.to_thread(store.expire_idle, max_idle, session_id=session_id)
        self.conversation.new_run(session_id)
        self._ended_here.pop(session_id, None)  # this create starts its new run
        self.tracker.create(session_id, user_id=user_id, metadata=metadata)
        session = await self.get_session(session_id)
        assert session is not None
        return session

    async def update_session(
        self,
        session_id: str,
        updates: dict[str, Any] | None = None,
        increment_requests: bool = False,
        add_processing_time: float = 0.0,
        mark_error: bool = False,
    ) -> bool:
        """Record metrics for a session (created on first use, as the guide's agents expect);
        ``True`` once recorded (aiecs expects a bool).

        ``updates`` is the second parameter, as in aiecs 2.2.0, and only ``None`` or ``{}``
        is accepted: aiecs applies it by overwriting the stored session's fields (its
        counters too), which would undo the additive, exactly-once counting here.

        :raises ValueError: ``updates`` is not empty, or a metric is invalid (field named).
        """
        if updates is not None and not isinstance(updates, dict):
            raise ValueError(
                f"updates: must be a dict or None (got {type(updates).__name__}); it is the "
                "second parameter, as in aiecs: pass increment_requests= and the rest by keyword"
            )
        if updates:
            raise ValueError(
                f"updates: not supported (got keys {sorted(updates)}); counters change only "
                "through increment_requests, add_processing_time and mark_error, and metadata "
                "is given to create_session"
            )
        self._reopen_if_ended_here(session_id)
        self.tracker.record(
            session_id,
            processing_time=add_processing_time,
            error=mark_error,
            counts_request=increment_requests,
        )
        return True

    def _reopen_if_ended_here(self, session_id: str) -> None:
        """A write to a session this engine ended starts a new run first (``create``): the
        agent goes on with it (aiecs clears a conversation with ``end_session(..,
        "cleared")`` and keeps talking), and its turns must not count in the ended run."""
        if session_id in self._ended_here:
            del self._ended_here[session_id]
            self.conversation.new_run(session_id)
            self.tracker.create(session_id)

    async def end_session(self, session_id: str, status: str = "completed") -> bool:
        """End the session's current run as ``completed``, ``failed`` or ``expired``; aiecs's
        ``cleared`` counts as ``completed`` (:data:`END_STATUS_ALIASES`). ``True`` once
        recorded. A question still unanswered in its conversation counts as a failed request.

        :raises ValueError: another status (the field named).
        """
        final = END_STATUS_ALIASES.get(status, status)
        if final not in ("completed", "failed", "expired"):
            raise ValueError(
                f"status: must be completed, failed, expired or cleared (got {status!r})"
            )
        self.conversation.ended(session_id)
        self.tracker.end(session_id, status=final)
        self._ended_here[session_id] = None
        self._ended_here.move_to_end(session_id)
        while len(self._ended_here) > MAX_ENDED_REMEMBERED:
            self._ended_here.popitem(last=False)
        return True

    async def cleanup_inactive_sessions(self, max_idle_seconds: float = 1800) -> int:
        """Expire sessions idle longer than ``max_idle_seconds``; returns how many.

        :raises ValueError: ``max_idle_seconds`` is not above 0 and at most 100 years
            (``SESSIONS_MAX_IDLE_SECONDS``' bounds); ``TypeError`` if it is not a number.
        """
        check_seconds("max_idle_seconds", max_idle_seconds)  # before any wait
        await self._read_own_writes()
        store = await self._opened_store()
        result = await asyncio.to_thread(store.expire_idle, max_idle_seconds)
        return result.count

    async def cleanup_expired_sessions(self, max_idle_hours: float = 24) -> int:
        """aiecs's cleanup: expire sessions idle longer than ``max_idle_hours``; how many.

        They are ended (``expired``, reason ``idle``), not deleted: the purge deletes them,
        with their conversations, ``SESSIONS_ENDED_RETENTION_DAYS`` later.

        :raises ValueError: ``max_idle_hours`` is not above 0 and at most 100 years
            (``TypeError`` if it is not a number).
        """
        check_hours("max_idle_hours", max_idle_hours)  # named as the caller passed it
        return await self.cleanup_inactive_sessions(max_idle_seconds=max_idle_hours * 3600)

    # -- conversation --------------------------------------------------------------------

    async def add_conversation_message(
        self,
        session_id: str,
        role: str,
        content: str,
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Add a message to the session's conversation (through the queue); ``True``.

        A user question answered by an assistant message counts as one request (unless
        ``infer_requests`` is off; :mod:`sessions.turns` says exactly what is inferred).

        :raises pydantic.ValidationError: a bad session id, role, content or metadata.
        """
        self._reopen_if_ended_here(session_id)
        self.conversation.add(session_id, role, content, metadata)
        return True

    async def get_conversation_history(
        self, session_id: str, limit: int = 50
    ) -> list[GuideMessage]:
        """The newest ``limit`` messages of the session's current run, oldest first, this
        engine's own included even before they are applied (no wait for the workers).

        :raises ValueError: ``limit`` is not an integer from 1 to 10,000, or an id breaks the
            ids' rule (``TypeError``: not an integer, not a str).
        """
        check_id("session_id", session_id)
        return await self.conversation.history(session_id, limit)

    # -- checkpoints (aiecs's ContextEngineAdapter, LangGraph checkpointers) ---------------

    async def store_checkpoint(
        self,
        thread_id: str,
        checkpoint_id: str,
        checkpoint_data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> bool:
        """Store a checkpoint as the thread's newest version; ``True`` once committed.

        :raises pydantic.ValidationError: a bad id, or data that is not JSON-serializable,
            too large or not storable.
        """
        store = await self._opened_store()
        await asyncio.to_thread(
            store.store_checkpoint, thread_id, checkpoint_id, checkpoint_data, metadata
        )
        return True

    put_checkpoint = store_checkpoint

    async def get_checkpoint(
        self, thread_id: str, checkpoint_id: str | None = None
    ) -> dict[str, Any] | None:
        """The checkpoint (its latest when ``checkpoint_id`` is ``None``) as aiecs's engine
        gives it: ``checkpoint_id``, ``thread_id``, ``data``, ``metadata``, ``created_at``
        (and ``version``); ``None`` when there is none."""
        check_id("thread_id", thread_id)
        if checkpoint_id is not None:
            check_id("checkpoint_id", checkpoint_id)
        store = await self._opened_store()
        found = await asyncio.to_thread(store.get_checkpoint, thread_id, checkpoint_id)
        return None if found is None else found.to_dict()

    async def list_checkpoints(self, thread_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """The thread's newest ``limit`` checkpoints, newest first, as :meth:`get_checkpoint`.

        :raises ValueError: ``limit`` is not an integer from 1 to 10,000, or an id breaks the
            ids' rule (``TypeError``: not an integer, not a str).
        """
        check_id("thread_id", thread_id)
        limit = check_limit("limit", limit)
        store = await self._opened_store()
        found = await asyncio.to_thread(store.list_checkpoints, thread_id, limit)
        return [checkpoint.to_dict() for checkpoint in found]

    async def put_writes(
        self, thread_id: str, checkpoint_id: str, task_id: str, writes_data: list[tuple[Any, ...]]
    ) -> bool:
        """Store a task's intermediate writes towards a checkpoint; ``True`` once committed."""
        store = await self._opened_store()
        await asyncio.to_thread(
            store.put_writes, thread_id, checkpoint_id, task_id, writes_data
        )
        return True

    async def get_writes(self, thread_id: str, checkpoint_id: str) -> list[tuple[Any, ...]]:
        """Every write put towards the checkpoint, by task id."""
        check_id("thread_id", thread_id)
        check_id("checkpoint_id", checkpoint_id)
        store = await self._opened_store()
        return await asyncio.to_thread(store.get_writes, thread_id, checkpoint_id)

    # -- reads ---------------------------------------------------------------------------

    async def get_session(self, session_id: str) -> GuideSession | None:
        """The session's current run; ``None`` for a session never heard of.

        :raises TypeError: ``session_id`` is not a ``str``.
        :raises ValueError: it breaks the id rule (1 to 255 printable ASCII characters).
        """
        check_id("session_id", session_id)  # before any wait
        await self._read_own_writes()
        store = await self._opened_store()
        record = await asyncio.to_thread(store.get, session_id)
        return None if record is None else GuideSession.from_record(record)

    async def list_sessions(
        self, user_id: str | None = None, status: str | None = None
    ) -> list[GuideSession]:
        """Every matching session (paged from the database by id).

        :raises ValueError: ``status`` is not ``active``, ``completed``, ``failed`` or
            ``expired``, or ``user_id`` breaks the id rule (``TypeError``: not a ``str``).
        """
        from sessions.queries import session_filter  # a read's (SQLAlchemy), as the store

        session_filter(user_id, status)  # checks them, before any wait
        await self._read_own_writes()
        store = await self._opened_store()
        records = await asyncio.to_thread(
            lambda: list(store.iter_sessions(user_id=user_id, status=status))
        )
        return [GuideSession.from_record(record) for record in records]
