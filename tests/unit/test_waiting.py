"""The suite's waiting helper: a wait fails when its work stops, not when a guess runs out."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import pytest

from tests.support import diagnostics
from tests.support.waiting import CPU_QUANTUM, cpu_budget, cpu_progress, cpu_seconds, wait_for


def test_a_wait_outlives_its_stall_window_while_the_work_progresses() -> None:
    readings = itertools.count()
    began = time.monotonic()
    # True only well after the stall window; progress changes at every reading meanwhile.
    wait_for(
        lambda: time.monotonic() - began > 1.5, "later", progress=lambda: next(readings), stall=1.0
    )


def test_a_wait_fails_once_its_work_stands_still() -> None:
    with pytest.raises(AssertionError, match=r"never: no progress for 0\.2 s"):
        wait_for(lambda: False, "never", progress=lambda: 7, stall=0.2)


def test_a_wait_fails_once_its_work_used_its_budget() -> None:
    readings = itertools.count(step=10)
    with pytest.raises(AssertionError, match=r"gave up waiting for never: the work advanced"):
        wait_for(lambda: False, "never", progress=lambda: next(readings), stall=60, budget=15)


def test_the_cpu_time_of_a_process_counts_its_children() -> None:
    spin = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}]); input()",
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        progress = cpu_progress(parent.pid)
        wait_for(
            lambda: cpu_seconds(parent.pid) >= 0.5,
            "the child's CPU time",
            progress=progress,
            budget=cpu_budget(30),
        )
        assert progress() >= 0.5 / CPU_QUANTUM
    finally:
        parent.kill()
        parent.wait()
    assert cpu_seconds(parent.pid) == 0.0  # gone
    assert cpu_seconds(os.getpid()) > 0


@pytest.fixture(autouse=True)
def only_this_tests_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """The waits here fail on purpose: they read no server a test before them left running
    (the fault suite's shared RabbitMQ node lives until the session ends)."""
    monkeypatch.setattr(diagnostics, "_sources", {})


def test_a_failed_wait_carries_what_its_sources_read_and_is_kept() -> None:
    def broken() -> str:
        raise OSError("log gone")

    kept = len(diagnostics.RECORDED)
    with (
        diagnostics.registered("a worker", lambda: "\n".join(f"line {n}" for n in range(40))),
        diagnostics.registered("a node", broken),
        pytest.raises(AssertionError) as failure,
    ):
        wait_for(lambda: False, "never", stall=0.1)
    message = str(failure.value)
    assert message.startswith("timed out after 0.1 s waiting for never\n")
    assert "--- a worker ---\n" in message
    # The last lines only, and a source that cannot be read says why without hiding the rest.
    assert "line 39" in message and "line 24" not in message and "line 25" in message
    assert "--- a node ---\n(could not be read: OSError: log gone)" in message
    ((test, reading),) = diagnostics.RECORDED[kept:]
    assert test.endswith(
        "::" + test_a_failed_wait_carries_what_its_sources_read_and_is_kept.__name__
    )
    assert reading in message
    # A source is read only while it is registered.
    with pytest.raises(AssertionError) as failure:
        wait_for(lambda: False, "never", stall=0.1)
    assert "--- a worker ---" not in str(failure.value)
