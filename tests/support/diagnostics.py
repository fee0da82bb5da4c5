"""What a failed wait leaves for the next engineer: the state of what the test waited on, read
at the moment it gave up.

A wait that fails says what it waited for; why (a worker that stopped logging, a broker node
that raised a resource alarm, a queue without a consumer) lives in logs and servers that are
deleted with the test's folders, and a CI log shows only its last lines. So the processes and
servers a test runs register a *source* here while they run (:func:`registered`);
:func:`record_failure` reads every source when a wait fails and keeps the reading under the
test's id, and the suite prints the readings of the tests that failed after the failure
reports, just before pytest's short summary (``tests/conftest.py``), where a CI log's tail
still holds them. One source is always there: the machine (free disk, memory, load).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Lines a source's reading is cut to (the last ones), so that a CI log's tail holds them all.
MAX_LINES = 15

_lock = threading.Lock()
_sources: dict[int, tuple[str, Callable[[], str]]] = {}
_next_handle = 0
#: (test id, reading) of every wait that failed in this run, in order.
RECORDED: list[tuple[str, str]] = []


def register(name: str, describe: Callable[[], str]) -> int:
    """Add a source: ``describe()`` returns what ``name`` looks like now (it may raise: the
    error is printed instead). Returns the handle :func:`unregister` takes."""
    global _next_handle
    with _lock:
        _next_handle += 1
        _sources[_next_handle] = (name, describe)
        return _next_handle


def unregister(handle: int) -> None:
    with _lock:
        _sources.pop(handle, None)


@contextmanager
def registered(name: str, describe: Callable[[], str]) -> Iterator[None]:
    """A source for as long as the ``with`` block runs."""
    handle = register(name, describe)
    try:
        yield
    finally:
        unregister(handle)


def last_lines(text: str, count: int = MAX_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-count:])


def snapshot() -> str:
    """Every registered source's reading, each headed by its name and cut to its last
    :data:`MAX_LINES` lines."""
    with _lock:
        sources = list(_sources.values())
    parts = []
    for name, describe in sources:
        try:
            reading = describe()
        except Exception as exc:  # a source that cannot be read says why, the rest still print
            reading = f"(could not be read: {type(exc).__name__}: {exc})"
        parts.append(f"--- {name} ---\n{last_lines(reading) or '(nothing)'}")
    return "\n".join(parts)


def machine_state() -> str:
    """Free disk where the tests write (a full disk stalls a server: RabbitMQ blocks every
    publisher below 50 MB free, and a log that cannot grow looks like a hung process),
    available memory and the load average."""
    places = {tempfile.gettempdir(), os.getcwd()}
    free = {place: shutil.disk_usage(place).free / 2**20 for place in sorted(places)}
    disks = ", ".join(f"{place}: {mib:,.0f} MiB free" for place, mib in free.items())
    with open("/proc/meminfo") as meminfo:
        available = next(line for line in meminfo if line.startswith("MemAvailable:"))
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{disks}\n{' '.join(available.split())}; load average {load}"


def current_test() -> str:
    """The id of the test running now (pytest sets ``PYTEST_CURRENT_TEST``), or ``"?"``."""
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]


def record_failure(message: str) -> str:
    """Read every source for the running test; ``message`` followed by the reading."""
    reading = snapshot()
    RECORDED.append((current_test(), reading))
    return f"{message}\n{reading}"


register("the machine", machine_state)
