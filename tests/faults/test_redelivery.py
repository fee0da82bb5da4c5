"""Scenario 4: a message delivered twice is counted once.

* **Published twice.** Every batch message is published twice by the real publisher (as a
  client that timed out on a publish that did reach the broker would), some copies back to
  back, some far apart.
* **Redelivered by Redis.** A short visibility timeout (1 s) and a slow apply: the test holds a
  lock on the session's row, so the worker's transaction for the batch waits; meanwhile the
  message's visibility timeout passes and a second worker, starting, restores it to the queue.
  The copy is taken and applied concurrently with the first, blocked one. When the lock is
  released, one transaction claims the batch in the ledger and the other finds it claimed.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sessions.events import Batch, CreateEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from tests.faults.harness import (
    Fleet,
    Monitor,
    Reference,
    compare,
    kill_group,
    record_outcome,
    recorded_batch,
    service_environment,
    wait_until,
)
from tests.faults.report import scaled
from tests.faults.servers import FaultBroker, PrivateRedis

pytestmark = [pytest.mark.slow]


def _outcomes(log: str, batch: Batch) -> tuple[int, int]:
    """How many deliveries of ``batch`` were applied, and how many found it a duplicate."""
    applied = len(re.findall(rf"batch {batch.batch_id}: [1-9]\d* events applied, 0 duplicate", log))
    duplicate = len(
        re.findall(rf"batch {batch.batch_id}: 0 events applied, [1-9]\d* duplicate", log)
    )
    return applied, duplicate


def test_the_same_message_published_twice_is_counted_once(
    tmp_path: Path, fault_database_url: str, fault_broker: FaultBroker
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, fault_broker.url
    environment = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=url)
    reference = Reference()
    sessions = [f"twice-{n}" for n in range(5)]
    batches = [recorded_batch(reference, sessions, 20, 20 * n) for n in range(scaled(50))]
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(concurrency=2)
        publisher = CeleryPublisher(Settings(broker_url=broker, database_url=url))
        # Back to back for the first half, the whole set again for the second half.
        half = len(batches) // 2
        for batch in batches[:half]:
            publisher(batch.to_message())
            publisher(batch.to_message())
        for batch in batches[half:]:
            publisher(batch.to_message())
        for batch in batches[half:]:
            publisher(batch.to_message())
        publisher.close()
        wait_until(
            lambda: worker.count(r"batch \S+: \d+ events applied") >= 2 * len(batches),
            timeout=120,
            message="both copies of every batch handled",
        )
        outcome = compare(reference, url)
        row = record_outcome(fault_broker.label("4a same message published twice"), outcome, began)
        row.sent = outcome.sent
        row.dead_lettered = monitor.dead_letter_count()
        row.notes.append(f"{len(batches)} batches x 2 messages")

        assert outcome.exact, outcome.describe()
        for batch in batches:
            assert _outcomes(worker.log, batch) == (1, 1), batch.batch_id
        assert row.dead_lettered == 0


def test_a_message_redis_redelivers_during_a_slow_apply_is_counted_once(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, redis_server.url
    visibility = 1
    environment = service_environment(
        SESSIONS_BROKER_URL=broker,
        SESSIONS_DATABASE_URL=url,
        SESSIONS_VISIBILITY_TIMEOUT_SECONDS=str(visibility),
    )
    settings = Settings(broker_url=broker, database_url=url, visibility_timeout_seconds=visibility)
    reference = Reference()
    rounds = scaled(2)
    sessions = [f"redelivered-{n}" for n in range(rounds)]
    redelivered: list[Batch] = []
    redis = redis_server.client()
    locker = create_engine(url)
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        fleet.worker(concurrency=2)
        publisher = CeleryPublisher(settings)
        created = Batch(
            events=tuple(CreateEvent(session_id=s, at=datetime.now(UTC)) for s in sessions)
        )
        publisher(created.to_message())
        wait_until(lambda: monitor.ledger_count() == 1, message="the sessions created")
        try:
            for number, session_id in enumerate(sessions):
                batch = recorded_batch(reference, [session_id], 25, 25 * number)
                with locker.connect() as connection, connection.begin() as transaction:
                    # The slow apply: the worker's transaction waits for this row lock.
                    connection.execute(
                        text("SELECT 1 FROM sessions WHERE session_id = :id FOR UPDATE"),
                        {"id": session_id},
                    )
                    publisher(batch.to_message())
                    wait_until(
                        lambda: monitor.waiting_on_locks("INSERT INTO sessions"),
                        message="the worker's apply to wait for the row lock",
                    )
                    wait_until(
                        lambda: any(
                            score < time.time() - visibility - 0.2
                            for _, score in redis.zrange(  # type: ignore[attr-defined]
                                "unacked_index", 0, -1, withscores=True
                            )
                        ),
                        message="the message to pass its visibility timeout",
                    )
                    # A consumer that starts restores every message past its visibility
                    # timeout: the batch is delivered again while its first delivery runs.
                    helper = fleet.worker(concurrency=1)
                    wait_until(
                        lambda: monitor.waiting_on_locks("INSERT INTO applied_batches"),
                        message="the redelivered copy to wait on the first one's ledger row",
                    )
                    transaction.rollback()
                redelivered.append(batch)
                wait_until(
                    lambda batch=batch: (
                        sum(  # type: ignore[misc]
                            _outcomes(fleet.logs_of("worker"), batch)
                        )
                        == 2
                    ),
                    message="both deliveries of the batch handled",
                )
                kill_group(helper)  # idle now; the next round starts a consumer of its own
        finally:
            locker.dispose()
            publisher.close()
        outcome = compare(reference, url)
        row = record_outcome("4b Redis redelivery, slow apply", outcome, began)
        row.dead_lettered = monitor.dead_letter_count()
        row.notes.append(
            f"{len(redelivered)} batches redelivered by a {visibility} s visibility timeout "
            "while their first delivery was still applying"
        )

        assert outcome.exact, outcome.describe()
        for batch in redelivered:
            assert _outcomes(fleet.logs_of("worker"), batch) == (1, 1), batch.batch_id
        assert row.dead_lettered == 0
