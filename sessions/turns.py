"""Requests inferred from a conversation: what an AIECS agent's calls on its context engine say.

An aiecs 2.2.0 ``HybridAgent`` never calls ``update_session``. Around each task its memory
plugin reads the session's history (before the task) and appends the user's turn and the
assistant's answer (after it, one right after the other). So, per session, as one engine sees
it:

* a ``user`` message answered by an ``assistant`` message is one request served;
* its processing time runs from the history read that preceded the user message (the task's
  start) to the answer; with no such read, from the user message to the answer;
* a ``user`` message not answered before the session's next ``user`` message, or before
  ``end_session``, is one failed request, timed from that read to the unanswered message.

Nothing else is inferred: a task that raises (aiecs then writes no turn at all), a task that
fails with an answer (indistinguishable from a success), turns split between engines, or a
session that is never ended with a question pending. Other roles (``system``, ``tool``) are
stored, never counted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sessions.rules import MAX_PROCESSING_TIME

#: Sessions whose turn is followed at once; the least recently used beyond are forgotten.
MAX_SESSIONS = 10_000


@dataclass(frozen=True, slots=True)
class InferredRequest:
    """One request the conversation showed: to be recorded like any other."""

    session_id: str
    processing_time: float
    error: bool
    #: Event time: the answer's, or the unanswered question's.
    at: datetime


@dataclass(slots=True)
class _Turn:
    #: ``clock()`` of the latest history read not yet followed by a question.
    read: float | None = None
    #: The pending question: when it was asked (event time, and ``clock()``) and when its
    #: turn started (``clock()``).
    asked_at: datetime | None = None
    asked: float = 0.0
    started: float = 0.0


class TurnInference:
    """Follows each session's turns and says which requests they make (see the module)."""

    def __init__(
        self, max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._turns: OrderedDict[str, _Turn] = OrderedDict()
        self._max_sessions = max_sessions
        self._clock = clock

    def _turn(self, session_id: str) -> _Turn:
        turn = self._turns.get(session_id)
        if turn is None:
            turn = self._turns[session_id] = _Turn()
            if len(self._turns) > self._max_sessions:
                self._turns.popitem(last=False)
        else:
            self._turns.move_to_end(session_id)
        return turn

    def history_read(self, session_id: str) -> None:
        """The session's history was read: a task may be starting."""
        # Kept even while a question is pending: after a failed task (no answer written),
        # the next task's read is its start, though the failure shows only at its question.
        self._turn(session_id).read = self._clock()

    def message(self, session_id: str, role: str, at: datetime) -> InferredRequest | None:
        """A message was added; the request it completes (or shows failed), if any."""
        if role not in ("user", "assistant"):
            return None
        turn = self._turn(session_id)
        now = self._clock()
        if role == "assistant":
            if turn.asked_at is None:
                return None  # an answer to no question seen here: nothing to count
            served = InferredRequest(session_id, _seconds(now - turn.started), False, at)
            turn.asked_at = turn.read = None  # a read during the turn started nothing
            return served
        unanswered = self._unanswered(session_id, turn)
        turn.asked_at, turn.asked = at, now
        turn.started = turn.read if turn.read is not None else now
        turn.read = None
        return unanswered

    def session_ended(self, session_id: str) -> InferredRequest | None:
        """The session is ended: a question still pending is a failed request."""
        turn = self._turns.pop(session_id, None)
        return None if turn is None else self._unanswered(session_id, turn)

    def forget(self, session_id: str) -> None:
        """Start afresh for ``session_id`` (a new run of it)."""
        self._turns.pop(session_id, None)

    @staticmethod
    def _unanswered(session_id: str, turn: _Turn) -> InferredRequest | None:
        if turn.asked_at is None:
            return None
        return InferredRequest(session_id, _seconds(turn.asked - turn.started), True, turn.asked_at)


def _seconds(value: float) -> float:
    return min(max(value, 0.0), MAX_PROCESSING_TIME)
