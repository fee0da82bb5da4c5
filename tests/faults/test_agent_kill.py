"""Scenario 10: the agent itself SIGKILLed while it records: what can it lose?

A SIGKILL gives the tracker no chance to flush, so the events recorded since its last cut
(at most one flush interval's worth, or one batch) die with the process; everything it had
published must still be applied, once. An agent process records into a session of its own
at a steady rate and is killed at a different moment each round; the scenario then waits for
the pipeline to drain and compares what the database counts with the agent's own counters at
the moment of the kill (``tests/faults/killed_agent.py``).

Asserted: every event published before the kill is applied, nothing is counted twice, and the
loss is what the buffer held. Measured and reported, never asserted: the events lost per kill,
in events and in milliseconds of recording.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sessions.settings import Settings
from tests.faults.harness import (
    Fleet,
    Monitor,
    broker_empty,
    counted,
    service_environment,
    wait_until,
)
from tests.faults.killed_agent import COUNTERS
from tests.faults.report import Row, add, scaled
from tests.faults.servers import PrivateRedis

pytestmark = [pytest.mark.slow]

#: Events per second the agent records.
RATE = 2000.0


def _kill_one_agent(number: int, tmp_path: Path, url: str, broker: str) -> tuple[int, int, int]:
    """Run an agent, SIGKILL it after a varying number of events; (recorded, published, applied)
    at the kill, with ``applied`` read once the pipeline has drained."""
    session_id = f"agent-kill-{number}"
    counters_path = tmp_path / f"counters-{number}"
    arguments = {
        "broker_url": broker,
        "database_url": url,
        "spool_dir": str(tmp_path / "spool"),
        "session_id": session_id,
        "rate": RATE,
        "counters": str(counters_path),
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.killed_agent", json.dumps(arguments)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        with counters_path.open("rb") as file:
            view = mmap.mmap(file.fileno(), COUNTERS.size, access=mmap.ACCESS_READ)
        # Kill points spread over the batch cycle: 300 events, then 37 more each round.
        target = 300 + 37 * number
        wait_until(
            lambda: COUNTERS.unpack(view[:])[0] >= target,
            timeout=60,
            message=f"agent {number} to record {target} events",
        )
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
        recorded, published = COUNTERS.unpack(view[:])
        view.close()
    finally:
        if agent.poll() is None:
            agent.kill()
    return recorded, published, _applied_once_drained(url, broker, session_id, published)


def _applied_once_drained(url: str, broker: str, session_id: str, published: int) -> int:
    import redis

    client = redis.Redis.from_url(broker)
    try:

        def drained() -> bool:
            counts = counted(url, [session_id]).get(session_id)
            return counts is not None and counts.requests >= published and broker_empty(client)

        wait_until(drained, timeout=60, message=f"{session_id}: the published events applied")
        # Drained twice in a row: nothing was in flight between a queue and a commit.
        wait_until(drained, timeout=60, message=f"{session_id}: still drained")
    finally:
        client.close()
    return counted(url, [session_id])[session_id].requests


def test_an_agent_sigkilled_loses_at_most_what_it_had_not_published(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url = fault_database_url
    environment = service_environment(
        SESSIONS_BROKER_URL=redis_server.url, SESSIONS_DATABASE_URL=url
    )
    kills = scaled(5, minimum=5)
    flush_interval_ms = Settings().flush_interval_ms
    results: list[tuple[int, int, int]] = []
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        fleet.worker(concurrency=2)
        for number in range(kills):
            results.append(_kill_one_agent(number, tmp_path, url, redis_server.url))
        dead_lettered = monitor.dead_letter_count()

    lost = [recorded - applied for recorded, _, applied in results]
    row = add(
        Row(
            scenario="10 agent SIGKILL (the documented bound)",
            sent=sum(recorded for recorded, _, _ in results),
            applied=sum(applied for _, _, applied in results),
            lost=sum(max(0, n) for n in lost),
            dead_lettered=dead_lettered,
            seconds=time.monotonic() - began,
        )
    )
    row.notes.append(
        f"{kills} kills at {RATE:,.0f} events/s, flush interval {flush_interval_ms} ms: lost "
        f"per kill min {min(lost)}, median {statistics.median(lost):g}, max {max(lost)} events "
        f"(= {max(lost) / RATE * 1000:.0f} ms of recording at most); the buffer at the kill "
        f"held {max(r - p for r, p, _ in results)} unpublished events at most"
    )
    for recorded, published, applied in results:
        # Everything published before the kill is applied; nothing is applied twice (the
        # agent's counters are read after its last record, so recorded may lag by one).
        assert published <= applied <= recorded + 1, (recorded, published, applied)
    assert dead_lettered == 0
