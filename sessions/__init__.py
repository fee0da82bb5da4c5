"""Exactly-once session metrics for AI agents.

Agents record through :class:`SessionTracker` (fire-and-forget) or the guide-compatible
:class:`ContextEngine`; Celery workers apply batches through :class:`SessionStore`.
"""

from __future__ import annotations

from sessions.errors import (
    BrokerUnavailableError,
    FlushTimeoutError,
    SessionLimitError,
    SessionsError,
    StoreUnavailableError,
)
from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent, SessionEvent
from sessions.records import Aggregate, ApplyResult, PurgeResult, SessionRecord, SweepResult
from sessions.settings import Settings, get_settings
from sessions.store import SessionStore

__all__ = [
    "Aggregate",
    "ApplyResult",
    "Batch",
    "BrokerUnavailableError",
    "CreateEvent",
    "EndEvent",
    "FlushTimeoutError",
    "PurgeResult",
    "RecordEvent",
    "SessionEvent",
    "SessionLimitError",
    "SessionRecord",
    "SessionStore",
    "SessionsError",
    "Settings",
    "StoreUnavailableError",
    "SweepResult",
    "get_settings",
]
