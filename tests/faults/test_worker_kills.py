"""Scenario 1: a worker SIGKILLed mid-ingest, again and again, restarted each time.

A producer keeps recording through a real tracker while the test kills at many different
moments: after a varying number of applied batches, aimed at a moment when a pool process of the
worker has a transaction open (found through ``pg_stat_activity`` and the socket it owns).

* **Pool processes.** The pool process holding the open transaction is SIGKILLed; Celery forks a
  replacement and, with ``task_reject_on_worker_lost``, puts the message back. Exact counts.
* **Whole worker, or its main process alone.** The worker is restarted each time, alternately
  running the pool the project configures (the whole process group is killed) and a prefork
  pool (only the main process is killed, orphaning its pool processes, which may still commit
  what they were applying, unacknowledged). Messages a killed worker held come back through Redis's
  visibility timeout (2 s here), or on RabbitMQ the moment the worker's connection closes.
  Nothing may be counted twice, and nothing may be lost. Redis alone would lose batches
  here: kombu's Redis transport takes a message off the queue (``BRPOP``) *before* it records
  it as unacknowledged, so a consumer killed in between takes the message with it, and no
  worker ever logs it as received (kombu #305). The tracker closes that gap: it keeps each
  batch until the ledger lists it and publishes it again after ``confirm_timeout_seconds``
  (see :mod:`sessions.outbox`); the report counts those republished batches. RabbitMQ has no
  such gap (a delivery is unacknowledged from the moment the broker sends it, and goes back
  to the queue when the consumer's channel closes), so on RabbitMQ 1b runs with republishing
  off: the broker alone must lose nothing.

Scenario 1a runs with republishing off on both brokers, so that it proves the worker side
alone: a killed pool process's message comes back through ``task_reject_on_worker_lost``.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sessions.tracker import SessionTracker
from tests.faults.harness import (
    PREFORK,
    CorrelatingPublisher,
    Fleet,
    Monitor,
    Outcome,
    Producer,
    Reference,
    ReferenceRecorder,
    agent_settings,
    alive,
    children,
    compare,
    kill_group,
    locate_batches,
    owner_of_local_port,
    received_by_a_worker,
    record_outcome,
    service_environment,
    settle,
    unconfirmed_batches,
    wait_until,
)
from tests.faults.report import Row, scaled
from tests.faults.servers import FaultBroker, PrivateRedis
from tests.support.workers_harness import CeleryProcess

pytestmark = [pytest.mark.slow]

VISIBILITY_TIMEOUT = 2
#: Scenario 1b's tracker publishes a batch again when the ledger lacks it this long after.
CONFIRM_TIMEOUT = 3.0
CONCURRENCY = 2
#: The pool each kind of kill needs: pool processes exist only in a prefork pool; a whole
#: worker is killed running the pool the project configures (``None``).
POOL_FOR = {"pool process": PREFORK, "main process": PREFORK, "whole worker": None}
#: Seconds between looks for an open transaction to aim a kill at.
AIM_POLL = 0.003


def _aim(monitor: Monitor, worker: CeleryProcess, timeout: float = 3.0) -> tuple[int | None, str]:
    """A pool process of ``worker`` with a transaction open right now, and that state.

    ``(None, "between transactions")`` when none was caught within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = [worker.process.pid, *children(worker.process.pid)]
        for backend in monitor.in_transaction():
            if backend.client_port is None:
                continue
            owner = owner_of_local_port(backend.client_port, pool)
            if owner is not None:
                return owner, f"in transaction ({backend.state})"
        time.sleep(AIM_POLL)
    return None, "between transactions"


def _unacked_restorable(redis_server: PrivateRedis) -> bool:
    """Every message a dead worker held is older than the visibility timeout (restorable)."""
    entries = redis_server.client().zrange("unacked_index", 0, -1, withscores=True)  # type: ignore[attr-defined]
    return all(score < time.time() - VISIBILITY_TIMEOUT - 0.5 for _, score in entries)


def _locate(fault_broker: FaultBroker, batch_ids: list[object]) -> dict[str, str]:
    """Where the broker has each batch (Redis can be read; RabbitMQ only counts its messages)."""
    if fault_broker.redis is not None:
        return locate_batches(fault_broker.redis.client(), batch_ids)
    assert fault_broker.rabbitmq is not None
    held = fault_broker.rabbitmq.messages(fault_broker.vhost)
    return {str(batch_id): f"unknown ({held} messages in the vhost)" for batch_id in batch_ids}


@dataclass
class KillRun:
    outcome: Outcome
    row: Row
    problem: str | None
    moments: list[str]
    #: Batches never applied: where the broker has them, and who received them ("none", "a
    #: killed worker" or "a surviving worker").
    unapplied: dict[str, tuple[str, str]] = field(default_factory=dict)
    statuses: dict[str, object] = field(default_factory=dict)


def _run(
    scenario: str,
    kinds: tuple[str, ...],
    tmp_path: Path,
    url: str,
    fault_broker: FaultBroker,
    confirm_timeout: float = 0.0,
) -> KillRun:
    began = time.monotonic()
    kills = scaled(10, minimum=10)
    broker = fault_broker.url
    redis_server = fault_broker.redis
    environment = service_environment(
        SESSIONS_BROKER_URL=broker,
        SESSIONS_DATABASE_URL=url,
        SESSIONS_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY_TIMEOUT),
        # Every kill aims at the process with a transaction open, and on a busy machine that is
        # often the redelivery of the batch the last kill hit: one batch may be killed by every
        # kill. More than SESSIONS_MAX_REDELIVERIES of them is the poison rule's (scenario 8),
        # which would set it aside; here the kills are the fault, not the batch.
        SESSIONS_MAX_REDELIVERIES=str(kills + 1),
    )
    settings = agent_settings(
        broker,
        url,
        visibility_timeout_seconds=VISIBILITY_TIMEOUT,
        confirm_timeout_seconds=confirm_timeout,
    )
    sessions = [f"kill-{n}" for n in range(30)]
    reference = Reference()
    moments: list[str] = []
    killed: list[CeleryProcess] = []
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(CONCURRENCY, pool=POOL_FOR[kinds[0]])
        publisher = CorrelatingPublisher(settings)
        tracker = SessionTracker(
            settings, max_batch_events=40, flush_interval=0.02, publisher=publisher
        )
        recorder = ReferenceRecorder(tracker, reference)
        for session_id in sessions:
            tracker.create(session_id, user_id="kill-user")
        producer = Producer(recorder, sessions, rate=800)
        producer.start()
        try:
            for number in range(kills):
                kind = kinds[number % len(kinds)]
                after = POOL_FOR[kinds[(number + 1) % len(kinds)]]  # the restarted worker's
                target = monitor.ledger_count() + 1 + number % 4
                wait_until(
                    lambda target=target: monitor.ledger_count() >= target,  # type: ignore[misc]
                    timeout=60,
                    message=f"kill point {number}: {target} batches applied",
                )
                victim, state = _aim(monitor, worker)
                applied = monitor.ledger_count()
                if kind == "pool process":
                    pool = children(worker.process.pid)
                    victim = victim if victim in pool else pool[0]
                    os.kill(victim, signal.SIGKILL)
                    wait_until(lambda v=victim: not alive(v), message="the pool process to die")  # type: ignore[misc]
                elif kind == "main process":
                    os.kill(worker.process.pid, signal.SIGKILL)
                    worker.process.wait()
                    killed.append(worker)
                    worker = fleet.worker(CONCURRENCY, pool=after)
                else:
                    kill_group(worker)
                    killed.append(worker)
                    worker = fleet.worker(CONCURRENCY, pool=after)
                moments.append(f"{kind} after {applied} batches, {state}")
        finally:
            producer.stop()
        # Everything recorded is published before the last worker goes away (a kill while a
        # message is on its way to a consumer is the one loss scenario 1b measures).
        tracker.flush()
        wait_until(lambda: tracker.stats.events_pending == 0, message="the last batches sent")
        stuck_batches = 0
        if "pool process" in kinds:
            wait_until(
                lambda: len(children(worker.process.pid)) == CONCURRENCY,
                message="the worker to replace its killed pool processes",
            )
            assert alive(worker.process.pid), "killing pool processes killed the worker"
            # A killed pool process's message must come back by itself, the worker living on.
            stuck = settle(tracker, fault_broker, timeout=10)
            stuck_batches = len(unconfirmed_batches(tracker)) if stuck else 0
        # A warm shutdown hands back what the last worker still holds; once every message the
        # dead workers held is past the visibility timeout, a fresh worker restores them all.
        # (RabbitMQ put each back when its holder's connection closed.)
        worker.stop()
        stale_mutex = False
        if redis_server is not None:
            wait_until(
                lambda: _unacked_restorable(redis_server),
                message="unacknowledged messages to pass the visibility timeout",
            )
            # A worker killed while restoring leaves Redis's restore lock behind for 5 minutes.
            stale_mutex = bool(redis_server.client().delete("unacked_mutex"))  # type: ignore[attr-defined]
        fleet.worker(CONCURRENCY)
        problem = settle(tracker, fault_broker)
        unapplied: dict[str, tuple[str, str]] = {}
        if problem is not None:
            places = _locate(fault_broker, unconfirmed_batches(tracker))
            for batch_id, place in places.items():
                receivers = [
                    w
                    for w in fleet.started
                    if w.name == "worker" and received_by_a_worker(w.log, batch_id)
                ]
                if not receivers:
                    unapplied[batch_id] = (place, "none")
                elif all(w in killed for w in receivers):
                    unapplied[batch_id] = (place, "a killed worker")
                else:
                    unapplied[batch_id] = (place, "a surviving worker")
        for session_id in sessions:
            tracker.end(session_id, status="completed")
        ending = settle(tracker, fault_broker, timeout=30)
        tracker.close()
        publisher.close()

        outcome = compare(reference, url)
        worker_logs = fleet.logs_of("worker")
        duplicates = len(re.findall(r"events applied, [1-9]\d* duplicate", worker_logs))
        row = record_outcome(scenario, outcome, began, recorder)
        row.dead_lettered = monitor.dead_letter_count()
        aimed = sum("in transaction" in moment for moment in moments)
        kinds_seen = ", ".join(f"{sum(m.startswith(k) for m in moments)} {k}" for k in kinds)
        row.notes.append(
            f"{kills} kills ({kinds_seen}), {aimed} with a transaction open; "
            f"{duplicates} redelivered batches dropped by the ledger"
            + ("; cleared a killed worker's stale unacked_mutex" if stale_mutex else "")
            + (
                f"; {tracker.stats.batches_republished} batches published again for want of "
                "confirmation"
                if confirm_timeout
                else "; republishing off"
            )
            + ("; agents without a database URL" if settings.confirms_on_redis else "")
        )
        if stuck_batches:
            row.notes.append(
                f"{stuck_batches} batches of killed pool processes were not applied until the "
                "worker was restarted"
            )
        if unapplied:
            never = sum(receiver == "none" for _, receiver in unapplied.values())
            row.notes.append(
                f"{len(unapplied)} batches never applied: {never} never received by any worker, "
                f"{len(unapplied) - never} received only by workers that were then killed"
            )
        statuses = {
            session_id: monitor.scalar(
                "SELECT status || '/' || run FROM sessions WHERE session_id = :id", id=session_id
            )
            for session_id in sessions
        }
    assert ending is None or problem is not None, ending
    return KillRun(outcome, row, problem, moments, unapplied, statuses)


def test_pool_processes_sigkilled_mid_transaction_lose_and_double_nothing(
    tmp_path: Path, fault_database_url: str, fault_broker: FaultBroker
) -> None:
    run = _run(
        fault_broker.label("1a pool process SIGKILL"),
        ("pool process",),
        tmp_path,
        fault_database_url,
        fault_broker,
    )
    assert run.problem is None, f"{run.problem}; unapplied batches: {run.unapplied}"
    assert run.outcome.exact, run.outcome.describe()
    assert run.row.dead_lettered == 0
    assert set(run.statuses.values()) == {"completed/1"}, run.statuses
    assert len(run.moments) >= 10
    assert sum("in transaction" in moment for moment in run.moments) >= len(run.moments) // 2, (
        f"too few kills hit an open transaction to test anything: {run.moments}"
    )


def test_whole_worker_sigkilled_and_restarted_counts_nothing_twice(
    tmp_path: Path, fault_database_url: str, fault_broker: FaultBroker
) -> None:
    # On RabbitMQ with republishing off: its acknowledgements alone must lose nothing.
    run = _run(
        fault_broker.label("1b worker SIGKILL + restart"),
        ("whole worker", "main process"),
        tmp_path,
        fault_database_url,
        fault_broker,
        confirm_timeout=CONFIRM_TIMEOUT if fault_broker.kind == "redis" else 0.0,
    )
    assert run.problem is None, f"{run.problem}; unapplied batches: {run.unapplied}"
    assert run.outcome.exact, run.outcome.describe()
    assert run.row.dead_lettered == 0
    assert set(run.statuses.values()) == {"completed/1"}, run.statuses
    assert len(run.moments) >= 10
