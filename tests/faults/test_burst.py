"""Scenario 12: a burst of recording -- two fresh agents each call ``record`` 200,000 times.

Two agent processes (``tests/faults/burst_agent.py``) start at the same moment, each builds a
tracker and at once records its events in a plain loop, as fast as the loop goes: far faster
than a publisher can send them, and while it is still connecting. The buffer fills in a
fraction of a second; what does not fit is spilled, in whole batches, to the spool the two
agents share, and published from there (by either agent, and by ``close``). A worker with two
pool processes applies it all.

Asserted: the database counts every event once, no tracker dropped or lost an event, every
spilled batch was published. Measured and reported, never asserted: how fast the loop went, how
much spilled, how long ``close`` took, the worst ``record`` call, the time until all applied.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    SETTLE_DEADLINE,
    Counts,
    Fleet,
    Monitor,
    Reference,
    broker_empty,
    compare,
    counted,
    record_outcome,
    service_environment,
    wait_until,
)
from tests.faults.report import scaled
from tests.faults.servers import PrivateRedis
from tests.support.workers_harness import REPO_ROOT

pytestmark = [pytest.mark.slow]

AGENTS = 2
SESSIONS_PER_AGENT = 100
#: Events per second a worker applies at the least, on a busy 2-core machine (it does
#: 30,000+ alone): what the deadlines below allow for the work they wait on.
SLOWEST_APPLY_RATE = 2_000.0
#: Events per second an agent's ``close`` publishes from its buffer and the spool at the least.
SLOWEST_PUBLISH_RATE = 5_000.0


def _start_agents(environment: dict[str, str], events: int, logs: Path) -> list[Any]:
    agents = []
    for number in range(AGENTS):
        stderr = (logs / f"burst-agent-{number}.log").open("w")
        agent = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.burst_agent"],
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        stderr.close()
        agents.append(agent)
    # The burst itself (the loop, the spills, close's replay) is what the agents wait for.
    close_timeout = SETTLE_DEADLINE + AGENTS * events / SLOWEST_PUBLISH_RATE
    for number, agent in enumerate(agents):  # both go at once: their arguments, on stdin
        arguments = {
            "sessions": [f"burst-{number}-{n}" for n in range(SESSIONS_PER_AGENT)],
            "offset": number * events,
            "events": events,
            "close_timeout": close_timeout,
        }
        assert agent.stdin is not None
        agent.stdin.write(json.dumps(arguments) + "\n")
        agent.stdin.flush()
    return agents


def test_two_fresh_agents_recording_a_burst_lose_nothing(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, redis_server.url
    # Both agents share one spool, as agents of one user on one machine do.
    environment = service_environment(
        SESSIONS_BROKER_URL=broker,
        SESSIONS_DATABASE_URL=url,
        SESSIONS_SPOOL_DIR=str(tmp_path / "spool"),
    )
    events = scaled(200_000)
    reference = Reference()
    results: list[dict[str, Any]] = []
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        workers = fleet.workers(1, concurrency=2)
        agents = _start_agents(environment, events, tmp_path)
        try:
            for number, agent in enumerate(agents):
                output, _ = agent.communicate(
                    timeout=2 * (SETTLE_DEADLINE + AGENTS * events / SLOWEST_PUBLISH_RATE)
                )
                log = (tmp_path / f"burst-agent-{number}.log").read_text()
                assert agent.returncode == 0, f"agent {number} failed: {output}\n{log}"
                results.append(json.loads(output.strip().splitlines()[-1]))
        finally:
            for agent in agents:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
        for result in results:
            reference.merge({k: Counts(**v) for k, v in result["counts"].items()})
        redis = redis_server.client()
        sessions = list(reference.sessions)

        def applied() -> bool:
            got = counted(url, sessions)
            return sum(c.requests for c in got.values()) >= reference.sent and broker_empty(redis)

        wait_until(
            applied,
            timeout=SETTLE_DEADLINE + reference.sent / SLOWEST_APPLY_RATE,
            message="every event applied and the broker drained",
        )
        outcome = compare(reference, url)
        row = record_outcome(f"12 burst: {AGENTS} fresh agents, unpaced", outcome, began)
        row.worst_record_us = max(result["worst_record_us"] for result in results)
        row.dead_lettered = monitor.dead_letter_count()
        stats = [result["stats"] for result in results]
        spilled = sum(s["events_spilled"] for s in stats)
        replayed = sum(s["events_replayed"] for s in stats)
        for number, result in enumerate(results):
            loop = result["loop_seconds"]
            row.notes.append(
                f"agent {number}: {events:,} records in {loop:.2f} s "
                f"({events / loop:,.0f}/s; tracker made in {result['tracker_seconds']:.2f} s), "
                f"{result['at_loop_end']['events_sent']:,} published during the loop, "
                f"{result['stats']['events_spilled']:,} spilled, close took "
                f"{result['close_seconds']:.1f} s, worst record() "
                f"{result['worst_record_us'] / 1000:,.1f} ms"
            )
        row.notes.append(f"{spilled:,} events spilled in all, {replayed:,} replayed")

        assert outcome.exact, outcome.describe()
        for result in stats:
            assert result["events_dropped"] == 0 and result["events_lost"] == 0, result
            assert result["events_recorded"] == events, result
        assert replayed >= spilled  # every spilled batch went out (replays of others' too)
        assert row.dead_lettered == 0
        assert all(worker.process.poll() is None for worker in workers)
