"""The tracker keeps what it cannot publish in the spool, and replays it in order."""

from __future__ import annotations

import json
import logging
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions import tracker as tracker_module
from sessions.settings import Settings
from sessions.spool import BatchSpool
from sessions.tracker import SessionTracker, open_spool
from tests.unit.test_tracker import NEVER, Recorder
from tests.workers_harness import DEADLINE, run_to_completion, wait_until


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracker_module, "PUBLISH_RETRY_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(tracker_module, "BROKER_DOWN_PAUSE", 0.05)


@pytest.fixture
def trackers() -> Iterator[list[SessionTracker]]:
    made: list[SessionTracker] = []
    yield made
    for tracker in made:
        tracker.close(timeout=DEADLINE)


def _tracker(made: list[SessionTracker], publisher: Recorder, **options: Any) -> SessionTracker:
    options.setdefault("flush_interval", NEVER)
    options.setdefault("max_batch_events", 10)
    made.append(SessionTracker(Settings(), publisher=publisher, **options))
    return made[-1]


def test_unsent_batches_go_to_the_spool_and_come_back_oldest_first(
    trackers: list[SessionTracker],
) -> None:
    publisher = Recorder(failures=10**9)  # the broker is down
    tracker = _tracker(trackers, publisher)
    for index in range(30):
        tracker.record(f"s-{index % 3}", processing_time=index)
    wait_until(lambda: tracker.stats.events_spooled == 30, message="three batches spooled")
    assert (tracker.stats.events_lost, publisher.messages) == (0, [])

    publisher.failures = 0  # the broker answers again
    for index in range(30, 35):
        tracker.record("s-0", processing_time=index)
    tracker.flush()
    wait_until(lambda: tracker.stats.events_sent + tracker.stats.events_replayed == 35)
    # Replayed before the newer batch, and every event exactly once.
    assert [e["processing_time"] for e in publisher.events()] == list(range(35))
    # The newer batch went straight out, or (cut inside the broker-down pause) via the spool.
    assert tracker.stats.events_replayed in (30, 35) and tracker.stats.events_lost == 0
    wait_until(lambda: len(open_spool(Settings()) or ()) == 0, message="the spool emptied")


def test_a_new_tracker_replays_what_an_earlier_run_left_in_the_spool(
    trackers: list[SessionTracker],
) -> None:
    down = Recorder(failures=10**9)
    first = _tracker(trackers, down)
    for index in range(10):
        first.record("s-1", processing_time=index)
    wait_until(lambda: first.stats.events_spooled == 10, message="the batch spooled")
    first.close()

    up = Recorder()
    second = _tracker(trackers, up)
    wait_until(lambda: second.stats.events_replayed == 10, message="the replay at start")
    assert [e["processing_time"] for e in up.events()] == list(range(10))
    assert up.messages[0]["batch_id"] == down.calls[0]["batch_id"]  # the same batch, same id


def test_without_a_spool_unsent_events_are_counted_as_lost_and_logged(
    trackers: list[SessionTracker], caplog: pytest.LogCaptureFixture
) -> None:
    tracker = _tracker(trackers, Recorder(failures=10**9), spool=None)
    with caplog.at_level(logging.ERROR, logger="sessions.tracker"):
        for _ in range(10):
            tracker.record("s-1")
        wait_until(lambda: tracker.stats.events_lost == 10, message="the batch given up")
    assert any("no spool" in record.message for record in caplog.records)


def test_a_full_spool_loses_only_the_overflow_and_says_so(
    trackers: list[SessionTracker], tmp_path: Path
) -> None:
    spool = BatchSpool(tmp_path, max_batches=2, max_bytes=10**6, max_age_seconds=3600)
    tracker = _tracker(trackers, Recorder(failures=10**9), spool=spool)
    for _ in range(40):
        tracker.record("s-1")
    wait_until(lambda: tracker.stats.events_failed == 40, message="every batch tried")
    stats = tracker.stats
    assert (stats.events_spooled, stats.events_lost) == (20, 20)
    assert spool.stats().overflowed_events == 20


SIGTERM_AGENT = """
    import json, os, signal, sys
    from sessions.tracker import SessionTracker

    out = open(sys.argv[1], "a")
    def publish(message):
        out.write(json.dumps(message) + "\\n"); out.flush()

    tracker = SessionTracker(publisher=publish, flush_interval=3600, max_batch_events=500)
    for n in range(10):
        tracker.record("agent-session", processing_time=n)
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()
"""


def test_sigterm_flushes_the_buffer_before_the_agent_dies(tmp_path: Path) -> None:
    published = tmp_path / "published.jsonl"
    agent = run_to_completion(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_AGENT), str(published)]
    )
    assert agent.returncode == -signal.SIGTERM, agent.stderr
    messages = [json.loads(line) for line in published.read_text().splitlines()]
    assert [e["processing_time"] for m in messages for e in m["events"]] == list(range(10))
