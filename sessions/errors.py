"""Exceptions the public API raises, one class per thing a caller may want to catch."""

from __future__ import annotations

import sys


class SessionsError(Exception):
    """Base class of every error this package raises on purpose."""


class SessionLimitError(SessionsError):
    """``create_session`` found the active-session cap reached, even after reclaiming idle ones."""


class StoreUnavailableError(SessionsError):
    """The database cannot be reached; the message names its URL with the password masked."""


class StoreUnusableError(SessionsError):
    """The database answers, but the store cannot work with it, and waiting will not help.

    A dialect the store does not support, or a schema it cannot bring to the newest
    revision. The message names the URL (password masked) and what is wrong with it.
    """


class UnsupportedDatabaseError(StoreUnusableError):
    """The URL names a database the store is not written for (only PostgreSQL and SQLite)."""


class SchemaNotAtHeadError(StoreUnusableError):
    """The schema is not at the newest revision this code knows (upgrading did not get it there)."""


class BrokerUnavailableError(SessionsError):
    """The broker cannot be reached; the message names its URL with the password masked."""


class UnserializableBatchError(SessionsError, ValueError):
    """Events cannot be serialised as JSON: the data is at fault, not the broker, and trying
    again cannot help. The tracker sets them aside (logged at ERROR, counted in
    ``stats.events_refused``) and sends the rest; ``flush(wait=True)`` raises this for them."""


class FlushTimeoutError(SessionsError, TimeoutError):
    """``flush(wait=True)`` did not see every sent event applied before its deadline."""


def is_pydantic_serialization_error(error: BaseException) -> bool:
    """Whether ``error`` is pydantic-core's ``PydanticSerializationError``, without importing
    pydantic-core (an agent that records never does): none can have been raised before it is."""
    core = sys.modules.get("pydantic_core")
    return core is not None and isinstance(error, core.PydanticSerializationError)


def first_line(error: BaseException) -> str:
    """``Type: first line of its message``, for a log line or an error that quotes ``error``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
