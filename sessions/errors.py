"""Exceptions the public API raises, one class per thing a caller may want to catch."""

from __future__ import annotations


class SessionsError(Exception):
    """Base class of every error this package raises on purpose."""


class SessionLimitError(SessionsError):
    """``create_session`` found the active-session cap reached, even after reclaiming idle ones."""


class StoreUnavailableError(SessionsError):
    """The database cannot be reached; the message names its URL with the password masked."""


class BrokerUnavailableError(SessionsError):
    """The broker cannot be reached; the message names its URL with the password masked."""


class FlushTimeoutError(SessionsError, TimeoutError):
    """``flush(wait=True)`` did not see every sent event applied before its deadline."""
