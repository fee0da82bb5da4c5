"""What the dashboard reads, through a store whose database connections cannot write.

Most numbers come from :class:`~sessions.store.SessionStore` itself (``aggregate``,
``unhealthy``, ``list``, ``get``), so the page shows exactly what the CLI and the API
report. The few counts the store has no call for are single statements here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import case, func, select

from sessions.records import SessionRecord
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.sweeps import error_rate_above


def open_read_only_store(settings: Settings) -> SessionStore:
    """A store on ``settings.database_url`` whose every connection refuses writes."""
    return SessionStore(settings.database_url, settings=settings, read_only=True)


@dataclass(frozen=True)
class HealthCounts:
    """Active sessions the health sweep would warn about, and those it would end."""

    #: Error rate above the warn rate, at or below the fail rate.
    warn: int
    #: Error rate above the fail rate: the next health sweep ends them as ``failed``.
    fail: int


def health_counts(store: SessionStore) -> HealthCounts:
    """Count the active sessions at each health level, as the health sweep judges them."""
    s = store.settings
    above_warn = error_rate_above(s.health_warn_rate, s.health_min_requests)
    above_fail = error_rate_above(s.health_fail_rate, s.health_min_requests)
    query = select(
        func.count().label("above_warn"),
        func.coalesce(func.sum(case((above_fail, 1), else_=0)), 0),
    ).where(above_warn)
    with store.engine.connect() as connection:
        warned, failing = connection.execute(query).one()
    return HealthCounts(warn=int(warned) - int(failing), fail=int(failing))


def health_level(record: SessionRecord, settings: Settings) -> Literal["warn", "fail"] | None:
    """The level the health sweep puts ``record`` at: the same rule as its SQL, in Python."""
    if record.status != "active" or record.request_count < settings.health_min_requests:
        return None
    if record.error_rate > settings.health_fail_rate:
        return "fail"
    return "warn" if record.error_rate > settings.health_warn_rate else None
