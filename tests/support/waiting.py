"""Waiting in tests on a machine that is never assumed to be idle.

A test waits for a condition, never for a time, and how long it may wait is derived from what
it waits for, not guessed. Other work shares the machine's cores: it makes the awaited work
slower, it does not make it stop. So :func:`wait_for` fails when the work *stops*:

* ``progress`` is a reading that changes while the awaited work advances: events counted in
  the database, batches in the ledger, a tracker's published events, bytes of a log, or the
  CPU time of the processes doing the work (:func:`cpu_progress`). The deadline is ``stall``
  seconds after the last change, so it extends as long as the work goes on, however slowly.
* ``budget``, for a numeric ``progress``: the most it may advance without the condition
  holding (a startup costs about the same CPU seconds on a busy machine as on an idle one,
  only more wall time), so work that goes on forever without ever succeeding fails too.

Without ``progress`` the wait is a plain deadline of ``stall`` seconds, for what is bounded by
something other than the machine's load (a SIGKILLed process disappearing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable

from tests.support.diagnostics import record_failure

#: Seconds between looks at a condition.
POLL = 0.05
#: Seconds between readings of a wait's progress (a reading may be a query).
PROGRESS_POLL = 0.5
#: Seconds a wait accepts without any progress before it fails.
STALL = float(os.environ.get("SESSIONS_TEST_STALL_SECONDS", "60"))
#: CPU seconds that count as one step of progress for :func:`cpu_progress`: an idle process's
#: housekeeping (a timer, a heartbeat) ticks far slower, a process at work far faster even
#: when it gets only a small share of a busy machine's cores.
CPU_QUANTUM = 0.25

_TICKS = os.sysconf("SC_CLK_TCK")


def wait_for(
    condition: Callable[[], object],
    message: str,
    *,
    progress: Callable[[], Hashable] | None = None,
    stall: float = STALL,
    budget: float | None = None,
) -> None:
    """Return once ``condition()`` is truthy.

    ``progress`` (see the module docstring) is read every :data:`PROGRESS_POLL` seconds; the
    wait fails with :class:`AssertionError` naming ``message`` once ``stall`` seconds pass
    without a change in it (or, without ``progress``, after ``stall`` seconds), or once a
    numeric ``progress`` has advanced by more than ``budget`` since the wait began; the
    message then carries what :mod:`tests.support.diagnostics` reads of the running workers
    and servers. Exceptions from ``condition`` or ``progress`` propagate (a process that
    died says so).
    """
    began = last_change = last_read = time.monotonic()
    first = last = progress() if progress is not None else None
    while not condition():
        now = time.monotonic()
        if progress is not None and now - last_read >= PROGRESS_POLL:
            last_read = now
            reading = progress()
            if reading != last:
                last, last_change = reading, now
            if budget is not None:
                assert isinstance(first, int | float) and isinstance(reading, int | float)
                if reading - first > budget:
                    raise AssertionError(
                        record_failure(
                            f"gave up waiting for {message}: the work advanced "
                            f"{reading - first:g} (budget {budget:g}) in {now - began:.0f} s "
                            "without it"
                        )
                    )
        if now - last_change > stall:
            if progress is None:
                raise AssertionError(
                    record_failure(f"timed out after {stall:g} s waiting for {message}")
                )
            raise AssertionError(
                record_failure(
                    f"timed out waiting for {message}: no progress for {stall:g} s "
                    f"({now - began:.0f} s in all; last progress reading {last!r})"
                )
            )
        time.sleep(POLL)


def process_table() -> dict[int, list[str]]:
    """Every live process's ``/proc/<pid>/stat`` fields after its command (state, ppid, ...)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                table[int(entry)] = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return table


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used by ``pid`` and its descendants, live or reaped.

    0.0 once the process is gone (so a wait on it fails by its own condition, not here).
    """
    parents: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for each, fields in process_table().items():
        # After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15).
        parents.setdefault(int(fields[1]), []).append(each)
        used[each] = sum(int(value) for value in fields[11:15]) / _TICKS
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += used.get(current, 0.0)
        todo += parents.get(current, [])
    return total


def cpu_progress(*pids: int) -> Callable[[], int]:
    """A ``progress`` for :func:`wait_for`: the CPU time of ``pids`` (with their descendants),
    in steps of :data:`CPU_QUANTUM` seconds. Multiply a ``budget`` in CPU seconds by
    ``1 / CPU_QUANTUM``, or use :func:`cpu_budget`."""
    return lambda: int(sum(cpu_seconds(pid) for pid in pids) / CPU_QUANTUM)


def cpu_budget(seconds: float) -> float:
    """``seconds`` of CPU time as a ``budget`` for a :func:`cpu_progress` wait."""
    return seconds / CPU_QUANTUM
