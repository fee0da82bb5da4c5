"""Scenario 8: a message that kills the worker process every time it is handled.

The worker runs a prefork pool with test code loaded alongside the product
(``--include tests.faults.poison_hook``): applying a batch with an event of session ``poison``
SIGKILLs the pool process, every time. With ``acks_late`` and ``task_reject_on_worker_lost``
the message goes back to the queue after each kill and would come back forever; the worker
counts each redelivery (committed before the attempt) and, once there have been more than
``max_redeliveries`` (2 here), dead-letters the message instead of handling it. So the poison
batch is handled ``max_redeliveries + 1`` times, each ending in a kill, and then set aside;
the good batches published around it are applied exactly, and the worker goes on working.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sessions.events import Batch, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from tests.faults.harness import (
    PREFORK,
    Fleet,
    Monitor,
    Reference,
    compare,
    record_outcome,
    recorded_batch,
    service_environment,
    wait_until,
    worker_arguments,
)
from tests.faults.poison_hook import KILLS_ENV, POISON_SESSION
from tests.faults.report import scaled
from tests.faults.servers import FaultBroker
from tests.support.workers_harness import CeleryProcess

pytestmark = [pytest.mark.slow]

MAX_REDELIVERIES = 2


def test_a_message_that_kills_the_worker_is_dead_lettered_after_bounded_deliveries(
    tmp_path: Path, fault_database_url: str, fault_broker: FaultBroker
) -> None:
    began = time.monotonic()
    url, broker = fault_database_url, fault_broker.url
    kills = tmp_path / "poison-kills"
    kills.touch()
    environment = service_environment(
        SESSIONS_BROKER_URL=broker,
        SESSIONS_DATABASE_URL=url,
        SESSIONS_MAX_REDELIVERIES=str(MAX_REDELIVERIES),
        **{KILLS_ENV: str(kills)},
    )
    settings = Settings(broker_url=broker, database_url=url)
    reference = Reference()
    sessions = [f"poison-neighbour-{n}" for n in range(8)]
    rounds = scaled(10)
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = CeleryProcess(
            "worker",
            [*worker_arguments(2, pool=PREFORK), "--include", "tests.faults.poison_hook"],
            fleet.environment,
            tmp_path,
        )
        fleet.started.append(worker)
        worker.wait_for_log(r"@\S+ ready\.", timeout=60)
        publisher = CeleryPublisher(settings)
        poison = Batch(
            events=tuple(
                RecordEvent(session_id=session_id, at=datetime.now(UTC), processing_time=0.01)
                for session_id in (sessions[0], POISON_SESSION, sessions[1])
            )
        )
        try:
            for number in range(rounds):
                publisher(recorded_batch(reference, sessions, 20, 20 * number).to_message())
            publisher(poison.to_message())
            for number in range(rounds, 2 * rounds):
                publisher(recorded_batch(reference, sessions, 20, 20 * number).to_message())

            def poison_dead_lettered() -> bool:
                return bool(
                    monitor.scalar(
                        "SELECT count(*) FROM dead_letters WHERE payload LIKE :poison",
                        poison=f"%{poison.batch_id}%",
                    )
                )

            wait_until(poison_dead_lettered, timeout=90, message="the poison batch dead-lettered")
            wait_until(
                lambda: compare(reference, url).applied >= reference.sent,
                timeout=60,
                message="the good batches around the poison one applied",
            )
            # The worker goes on: batches published after the poison one was set aside.
            sent_before = reference.sent
            for number in range(2 * rounds, 3 * rounds):
                publisher(recorded_batch(reference, sessions, 20, 20 * number).to_message())
            wait_until(
                lambda: compare(reference, url).applied >= reference.sent,
                timeout=60,
                message="batches published afterwards applied",
            )
        finally:
            publisher.close()

        outcome = compare(reference, url)
        killed = kills.read_text().split()
        killed_pids, task_ids = set(killed[0::2]), set(killed[1::2])
        with monitor.engine.connect() as connection:
            dead = connection.exec_driver_sql(
                "SELECT batch_id, reason FROM dead_letters ORDER BY id"
            ).all()
        reasons = [str(reason) for _, reason in dead]
        poison_rows = int(
            monitor.scalar(
                "SELECT count(*) FROM sessions WHERE session_id = :id", id=POISON_SESSION
            )
            or 0
        )
        scenario = fault_broker.label("8 poison message kills the worker")
        row = record_outcome(scenario, outcome, began)
        row.dead_lettered = len(reasons)
        row.notes.append(
            f"poison batch handled {len(killed) // 2} times, each SIGKILLing a pool process "
            f"({len(killed_pids)} pids), then dead-lettered with max_redeliveries="
            f"{MAX_REDELIVERIES}; {sent_before} good events around it, "
            f"{reference.sent - sent_before} after; worker pid {worker.process.pid} throughout; "
            f"dead letter batch_id {dead[0][0] if dead else None!r}"
        )

        assert worker.process.poll() is None, f"the worker exited:\n{worker.log[-3000:]}"
        assert len(killed) // 2 == MAX_REDELIVERIES + 1, killed
        assert len(task_ids) == 1, task_ids
        assert len(reasons) == 1, reasons
        assert "redelivered unfinished" in reasons[0], reasons
        assert poison_rows == 0
        assert outcome.exact, outcome.describe()
