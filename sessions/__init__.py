"""Exactly-once session metrics for AI agents.

Agents record through :class:`SessionTracker` (fire-and-forget) or the guide-compatible
:class:`ContextEngine`; Celery workers apply batches through :class:`SessionStore`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sessions.errors import (
    BrokerUnavailableError,
    FlushTimeoutError,
    SessionLimitError,
    SessionsError,
    StoreUnavailableError,
    UnserializableBatchError,
)
from sessions.events import Batch, CreateEvent, EndEvent, MessageEvent, RecordEvent, SessionEvent
from sessions.records import (
    Aggregate,
    ApplyResult,
    MinuteActivity,
    PurgeResult,
    SessionRecord,
    SweepResult,
    UserAggregate,
)
from sessions.settings import Settings, get_settings
from sessions.store import SessionStore

if TYPE_CHECKING:
    from sessions.context_engine import ContextEngine, GuideSession
    from sessions.conversation import GuideMessage
    from sessions.tracker import SessionTracker

#: Imported on first use: the client brings in Celery, which a store-only user never needs.
_LAZY = {
    "ContextEngine": "sessions.context_engine",
    "GuideSession": "sessions.context_engine",
    "GuideMessage": "sessions.conversation",
    "SessionTracker": "sessions.tracker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sessions' has no attribute {name!r}")


__all__ = [
    "Aggregate",
    "ApplyResult",
    "Batch",
    "BrokerUnavailableError",
    "ContextEngine",
    "CreateEvent",
    "EndEvent",
    "FlushTimeoutError",
    "GuideMessage",
    "GuideSession",
    "MessageEvent",
    "MinuteActivity",
    "PurgeResult",
    "RecordEvent",
    "SessionEvent",
    "SessionLimitError",
    "SessionRecord",
    "SessionStore",
    "SessionTracker",
    "SessionsError",
    "Settings",
    "StoreUnavailableError",
    "SweepResult",
    "UnserializableBatchError",
    "UserAggregate",
    "get_settings",
]
