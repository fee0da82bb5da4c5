"""The conversation side of :class:`~sessions.context_engine.ContextEngine`.

Messages are events like the others: :meth:`Conversation.add` validates one, hands it to the
tracker (microseconds, no I/O) and returns; the workers store it exactly once, in the run live
at its time. Each message gets its place in the session's conversation here, ``seq``, from a
hybrid logical clock per session: the wall clock in microseconds, but always past the last
``seq`` this engine wrote or read for the session. So one engine's messages keep their order
whatever order their batches are applied in, and an answer written after reading the history
sorts after every message in it, whichever process wrote those.

Reading the history never waits for the workers: it reads the store and adds this engine's own
messages that are not applied yet (read-your-writes, at the cost of one query).
:class:`~sessions.turns.TurnInference` counts the requests the turns show.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sessions.bounds import check_limit
from sessions.events import MessageEvent
from sessions.mapping import MappingAccess
from sessions.records import MessageRecord
from sessions.tracker import SessionTracker
from sessions.turns import InferredRequest, TurnInference

if TYPE_CHECKING:
    from sessions.store import SessionStore  # only the history's read opens one

#: Sessions whose clock and unapplied messages an engine keeps; the least recently used go.
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class GuideMessage(MappingAccess):
    """A conversation message as an AIECS agent reads it: ``.role``, ``.content``,
    ``.timestamp`` (naive UTC, as aiecs's own engine gives) and ``.metadata``, also by key."""

    role: str
    content: str
    timestamp: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str = ""
    seq: int = 0
    message_id: uuid.UUID = field(default_factory=uuid.uuid4)

    @classmethod
    def of(cls, item: MessageRecord | MessageEvent) -> GuideMessage:
        return cls(
            role=item.role,
            content=item.content,
            timestamp=item.at.astimezone(UTC).replace(tzinfo=None),
            metadata=dict(item.metadata or {}),
            session_id=item.session_id,
            seq=item.seq,
            message_id=item.message_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """As aiecs's ``ConversationMessage.to_dict()``: role, content, ISO timestamp, metadata."""
        return {
            "role": self.role,
            "content": self.content,
            "timestamp": self.timestamp.isoformat(),
            "metadata": self.metadata,
        }


def _order(item: MessageRecord | MessageEvent) -> tuple[int, str]:
    return item.seq, str(item.message_id)


class _Session:
    """What the engine keeps for one session: its clock and its messages not yet seen stored."""

    __slots__ = ("last_seq", "unapplied")

    def __init__(self) -> None:
        self.last_seq = 0
        self.unapplied: OrderedDict[uuid.UUID, MessageEvent] = OrderedDict()


class Conversation:
    """Writes, reads and counts a conversation for one engine (see the module).

    ``store`` gives the store the history is read from; it is called by the first read only
    (the engine opens its store then), so writing a conversation needs no database.
    ``retention`` is the store's ``SESSIONS_CONVERSATION_MAX_MESSAGES``: no more of the
    engine's own unapplied messages are kept per session (the oldest are forgotten from the
    reads; they are still stored once applied). With ``infer_requests=False`` no request
    is counted from the turns (for code that calls ``update_session`` per task itself).
    """

    def __init__(
        self,
        tracker: SessionTracker,
        store: Callable[[], SessionStore],
        *,
        retention: int,
        infer_requests: bool = True,
    ) -> None:
        self._tracker = tracker
        self._store = store
        self._retention = retention
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.turns: TurnInference | None = TurnInference() if infer_requests else None

    def _session(self, session_id: str) -> _Session:
        kept = self._sessions.get(session_id)
        if kept is None:
            kept = self._sessions[session_id] = _Session()
            if len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session_id)
        return kept

    def add(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None
    ) -> None:
        """Record one message (and the request it completes, if it does).

        :raises pydantic.ValidationError: a bad session id, role, content or metadata.
        """
        kept = self._session(session_id)
        seq = max(time.time_ns() // 1000, kept.last_seq + 1)
        event = self._tracker.message(session_id, role, content, metadata, seq=seq)
        kept.last_seq = seq
        kept.unapplied[event.message_id] = event
        while len(kept.unapplied) > self._retention:
            kept.unapplied.popitem(last=False)
        if self.turns is not None:
            self._record(self.turns.message(session_id, role, event.at))

    async def history(self, session_id: str, limit: int) -> list[GuideMessage]:
        """The newest ``limit`` messages of the session's live run, oldest first, with this
        engine's own messages not applied yet.

        :raises ValueError: ``limit`` is not an integer from 1 to 10,000 (``TypeError``: not an
            integer).
        """
        check_limit("limit", limit)
        if self.turns is not None:
            self.turns.history_read(session_id)
        stored = await asyncio.to_thread(lambda: self._store().conversation(session_id, limit))
        kept = self._session(session_id)
        items: list[MessageRecord | MessageEvent] = list(stored)
        if kept.unapplied:
            for message in stored:
                kept.unapplied.pop(message.message_id, None)
            if len(stored) >= self._retention:
                # The run holds as many messages as it keeps: an own message older than all
                # of them is trimmed already, or will be as soon as it is applied. (One kept
                # beyond a smaller page is harmless: the merge below cuts it.)
                oldest = _order(stored[0])
                for message_id, event in list(kept.unapplied.items()):
                    if _order(event) < oldest:
                        del kept.unapplied[message_id]
            items.extend(kept.unapplied.values())
            items.sort(key=_order)
            items = items[-limit:]
        if stored:
            kept.last_seq = max(kept.last_seq, stored[-1].seq)
        return [GuideMessage.of(item) for item in items]

    def ended(self, session_id: str) -> None:
        """The session is being ended: a question still pending counts as a failed request."""
        if self.turns is not None:
            self._record(self.turns.session_ended(session_id))

    def new_run(self, session_id: str) -> None:
        """The session starts over (``create_session``, after every write was applied)."""
        kept = self._sessions.get(session_id)
        if kept is not None:
            kept.unapplied.clear()
        if self.turns is not None:
            self.turns.forget(session_id)

    def _record(self, request: InferredRequest | None) -> None:
        if request is not None:
            self._tracker.record(
                request.session_id,
                processing_time=request.processing_time,
                error=request.error,
                at=request.at,
            )
