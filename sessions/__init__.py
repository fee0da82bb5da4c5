"""Exactly-once session metrics for AI agents.

Agents record through :class:`SessionTracker` (fire-and-forget) or the guide-compatible
:class:`ContextEngine`; Celery workers apply batches through :class:`SessionStore`.

Every name here is imported on first use (PEP 562): ``from sessions import SessionTracker``
brings in the client and kombu, never Celery, SQLAlchemy, Alembic or Starlette, which only the
store, the worker and the dashboard need, nor pydantic, which only an argument or a setting
that is not plainly valid needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sessions.client_settings import ClientSettings
    from sessions.context_engine import ContextEngine, GuideSession
    from sessions.conversation import GuideMessage
    from sessions.errors import (
        BrokerUnavailableError,
        FlushTimeoutError,
        SessionLimitError,
        SessionsError,
        StoreUnavailableError,
        UnserializableBatchError,
    )
    from sessions.events import (
        Batch,
        CreateEvent,
        EndEvent,
        MessageEvent,
        RecordEvent,
        SessionEvent,
    )
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
    from sessions.tracker import SessionTracker

#: Where each exported name lives.
_EXPORTS = {
    "Aggregate": "sessions.records",
    "ApplyResult": "sessions.records",
    "Batch": "sessions.events",
    "BrokerUnavailableError": "sessions.errors",
    "ClientSettings": "sessions.client_settings",
    "ContextEngine": "sessions.context_engine",
    "CreateEvent": "sessions.events",
    "EndEvent": "sessions.events",
    "FlushTimeoutError": "sessions.errors",
    "GuideMessage": "sessions.conversation",
    "GuideSession": "sessions.context_engine",
    "MessageEvent": "sessions.events",
    "MinuteActivity": "sessions.records",
    "PurgeResult": "sessions.records",
    "RecordEvent": "sessions.events",
    "SessionEvent": "sessions.events",
    "SessionLimitError": "sessions.errors",
    "SessionRecord": "sessions.records",
    "SessionStore": "sessions.store",
    "SessionTracker": "sessions.tracker",
    "SessionsError": "sessions.errors",
    "Settings": "sessions.settings",
    "StoreUnavailableError": "sessions.errors",
    "SweepResult": "sessions.records",
    "UnserializableBatchError": "sessions.errors",
    "UserAggregate": "sessions.records",
    "get_settings": "sessions.settings",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sessions' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Aggregate",
    "ApplyResult",
    "Batch",
    "BrokerUnavailableError",
    "ClientSettings",
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
