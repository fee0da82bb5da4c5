"""Scenario 7: hot rows -- 4 workers with concurrency, 16 producer processes, 3 sessions.

Sixteen agent processes start recording at the same moment, every event on one of three
sessions, in small batches; four workers with two pool processes each apply them, so up to
eight transactions at a time add to the same three rows (and retry deadlocks or conflicts).
Every event must count once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
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
from tests.support.waiting import cpu_progress, wait_for
from tests.support.workers_harness import REPO_ROOT, worker_activity

pytestmark = [pytest.mark.slow]

PRODUCERS = 16
WORKERS = 4
SESSIONS = ["hot-a", "hot-b", "hot-c"]


def test_sixteen_producers_four_workers_three_sessions_count_exactly(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, redis_server.url
    environment = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=url)
    per_producer = scaled(400)
    reference = Reference()
    producers: list[subprocess.Popen[str]] = []
    error_logs = []
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        workers = fleet.workers(WORKERS, concurrency=2)
        try:
            for number in range(PRODUCERS):
                arguments = {
                    "broker_url": broker,
                    "database_url": url,
                    "sessions": SESSIONS,
                    "events": per_producer,
                    "offset": number * per_producer,
                    "batch": 25,
                }
                error_logs.append((tmp_path / f"producer-{number}.log").open("w"))
                producers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.faults.producer", json.dumps(arguments)],
                        cwd=REPO_ROOT,
                        env=environment,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=error_logs[-1],
                        text=True,
                    )
                )
            for producer in producers:
                assert producer.stdout is not None
                line = producer.stdout.readline()
                assert line.strip() == "ready", f"a producer did not start: {line!r}"
            for producer in producers:  # all go at once
                assert producer.stdin is not None
                producer.stdin.write("go\n")
                producer.stdin.flush()
            # The producers record, then close their trackers (which waits for the broker).
            wait_for(
                lambda: all(producer.poll() is not None for producer in producers),
                "every producer to finish",
                progress=lambda: (
                    cpu_progress(*(producer.pid for producer in producers))(),
                    worker_activity(),
                ),
            )
            results = []
            for producer in producers:
                output, _ = producer.communicate()
                assert producer.returncode == 0, f"a producer failed: {output}"
                results.append(json.loads(output.strip().splitlines()[-1]))
        finally:
            for producer in producers:
                if producer.poll() is None:
                    producer.kill()
                    producer.wait()
            for handle in error_logs:
                handle.close()
        for result in results:
            reference.merge({k: Counts(**v) for k, v in result["counts"].items()})
            assert result["stats"]["events_sent"] == result["sent"], result["stats"]
        redis = redis_server.client()

        def applied() -> bool:
            got = counted(url, SESSIONS)
            return sum(c.requests for c in got.values()) >= reference.sent and broker_empty(redis)

        wait_until(applied, timeout=180, message="every event applied and the broker drained")
        outcome = compare(reference, url)
        row = record_outcome("7 hot rows (16 producers, 4 workers)", outcome, began)
        row.worst_record_us = max(result["worst_record_us"] for result in results)
        row.dead_lettered = monitor.dead_letter_count()
        logs = "\n".join(worker.log for worker in workers)
        retried = logs.count("retrying a transaction after")
        row.notes.append(
            f"{PRODUCERS} x {per_producer} events on {len(SESSIONS)} sessions, "
            f"{WORKERS} workers x 2 processes; {retried} transactions retried after a conflict"
        )

        assert outcome.exact, outcome.describe()
        assert row.dead_lettered == 0
        assert all(worker.process.poll() is None for worker in workers)
