"""The dashboard overview's store calls, and a timer for them (not a test).

Imports only ``sessions`` and the standard library, so that ``bench/dash_bisect_calls.py`` can
load it from its file next to an older tree's ``sessions`` (which has no such module).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sessions.store import SessionStore


def overview_calls(store: SessionStore) -> dict[str, Callable[[], object]]:
    """The overview's reads with its default parameters (``minutes=60``, ``top=10``,
    ``unhealthy=50``), by name."""
    from sessions.dashboard.reads import by_status, health_counts

    def activity() -> object:
        now = datetime.now(UTC)
        return store.activity(now - timedelta(minutes=59), now)

    return {
        "activity": activity,
        "unhealthy": lambda: store.unhealthy(limit=50),
        "by_status": lambda: by_status(store),
        "top_users(requests)": lambda: store.top_users(by="requests", limit=10),
        "top_users(p95)": lambda: store.top_users(by="p95", limit=10),
        "health_counts": lambda: health_counts(store),
    }


def call_seconds(call: Callable[[], object], repeat: int) -> list[float]:
    """The wall-clock seconds of ``repeat`` calls of ``call``, one after the other."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds
