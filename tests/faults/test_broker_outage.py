"""Scenario 3: Redis stopped while agents keep recording, then started again.

The broker is a private ``redis-server`` of this test's own, and the worker is started exactly
as the README says (``celery -A workers worker -Q sessions.events,sessions.maintenance``): it
must outlive every restart of its broker on its own, so no scenario here ever restarts it (it
is the same process, alive, at the end). Producer threads record through a real
:class:`SessionTracker` (its spool in a folder under ``tmp_path``) before, during and after an
outage of several seconds. ``record`` must never raise (its worst latency during the outage is
measured and reported, never asserted); the batches that could not be published go to the spool
and are replayed once Redis answers again; the database ends with exactly the events sent. The
server is shut down as an operator would (``SHUTDOWN SAVE``) so that the messages it had
already accepted survive the restart: what is under test is the client's spool, not Redis's
durability (a server killed without persistence loses its queue: the third case).

On RabbitMQ (a private node of the test's own) the node is SIGKILLed and stopped in turn, with
the tracker's republishing off, and the worker is never restarted by the test: quorum queues
and publisher confirms must keep every message the broker took, the spool every one it did not.

A second case closes a tracker during the outage: its unsent batches stay in the spool, and a
new tracker (same spool folder, same broker URL: the same spool file) replays them.

A third case SIGKILLs Redis and starts it again *empty* (no persistence: a restarted cache, a
failed-over replica), several times while agents record, each time while the queue holds
messages no worker has taken (published while the worker's consumer was frozen by SIGSTOP: a
stall, as a long pause or a starved machine makes one; it is resumed right after the kill).
Those are gone with the server; the tracker sees them missing
from the ledger and publishes them again, and the worker, which lost its connection in the
middle of acknowledging and rejecting messages (``sessions.worker.stale_channel``), reconnects and
applies them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from itertools import accumulate, takewhile
from pathlib import Path
from typing import Any

import pytest

from sessions.confirming import CONFIRM_POLL_INTERVAL
from sessions.sending import BACKLOG_RECHECK_INTERVAL, REPLAY_CHUNK
from sessions.settings import Settings
from sessions.tracker import SessionTracker
from tests.faults.harness import (
    SETTLE_DEADLINE,
    Fleet,
    Monitor,
    Producer,
    Reference,
    ReferenceRecorder,
    agent_settings,
    compare,
    deadline_passed,
    record_outcome,
    service_environment,
    settle,
    wait_until,
)
from tests.faults.report import scaled
from tests.faults.servers import FaultBroker, PrivateRabbitMQ, PrivateRedis
from tests.support.workers_harness import CeleryProcess

pytestmark = [pytest.mark.slow]

#: How long the broker stays down at least (it also stays down until batches were spooled).
OUTAGE_SECONDS = 5.0
#: Redis visibility timeout for the worker: a message it took before the outage and could not
#: acknowledge over the lost connection comes back this soon (the ledger drops a second copy).
VISIBILITY_SECONDS = 5
#: A batch the ledger still lacks this long after it was published is published again: a
#: Redis restarted empty forgets what it held, and a worker can lose a batch it was receiving.
CONFIRM_TIMEOUT = 5.0
#: How long Redis stays dead at least in the empty-restart case (agents record meanwhile).
KILLED_SECONDS = 2.0
#: Events one agent records at once just before a kill, so that the queue holds messages no
#: worker has taken yet when Redis dies: 40 batches of 50 where a worker reserves 8 at a time
#: (and under half the tracker's buffer of 100 batches, which the producers share).
BURST_EVENTS = 2000
#: Celery's consumer tries a lost broker again after 2, 4, 6, ... and at most 30 s (kombu's
#: ``ensure_connection`` defaults, which Celery uses) ...
CELERY_RETRY_INTERVALS = tuple(min(30, 2 * n) for n in range(1, 16))
#: ... and ``broker_connection_timeout`` (sessions.worker.config) bounds each try.
CONNECT_SECONDS = 2.0
#: What a worker does after connecting before it consumes: mingle waits 1 s for neighbours.
READY_SECONDS = 1.0
#: Both cores are shared with other suites: whatever the sums above allow, allow this much more.
BUSY_MACHINE = 3.0
#: Messages a second the README's worker applies beyond what the agents of the empty-restart
#: case send (10 a second: one per flush interval), at the least: it was seen applying 25 a
#: second with both cores shared with a load average of 10.
WORKER_SPARE_RATE = 5.0
#: The empty-restart case's agents cut a batch every 100 ms (30 events), a load the worker can
#: get ahead of on a busy machine: the tracker holds back republishing while the queue has a
#: backlog, so an agent sending more than the worker applies would delay it until it stops.
EMPTY_CASE_FLUSH_INTERVAL = 0.1
#: The worker command, exactly as the README gives it ("Running it in production").
README_WORKER = ["worker", "-Q", "sessions.events,sessions.maintenance", "--loglevel", "INFO"]


@contextlib.contextmanager
def readme_pipeline(
    tmp_path: Path, url: str, broker: str
) -> Iterator[tuple[Settings, Monitor, CeleryProcess]]:
    """The agents' settings, a monitor of the database and one worker started as the README
    says (Celery's own defaults: prefork with one process per core, mingle, gossip and
    heartbeats on), consuming when this yields; the worker is killed at the end."""
    environment, settings = _configuration(tmp_path, url, broker)
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = CeleryProcess("worker", README_WORKER, fleet.environment, fleet.logs)
        fleet.started.append(worker)
        worker.wait_for_log(r"@\S+ ready\.", timeout=60)
        yield settings, monitor, worker


def recording_agents(
    tracker: SessionTracker, reference: Reference, sessions: list[str], rate: float
) -> tuple[list[ReferenceRecorder], list[Producer]]:
    """Two agent threads recording through ``tracker``, each over half of ``sessions`` at
    ``rate`` events a second; started."""
    recorders = [ReferenceRecorder(tracker, reference) for _ in range(2)]
    producers = [
        Producer(recorder, sessions[number::2], rate=rate)
        for number, recorder in enumerate(recorders)
    ]
    for producer in producers:
        producer.start()
    return recorders, producers


def reconnect_deadline(down_for: float) -> float:
    """Seconds from Redis answering again until a worker that lost it ``down_for`` seconds
    earlier is consuming: the gap between Celery's tries around that moment, one try, mingle."""
    tried_at = [0.0, *accumulate(CELERY_RETRY_INTERVALS)]
    passed = len(list(takewhile(lambda moment: moment <= down_for, tried_at)))
    gap = CELERY_RETRY_INTERVALS[min(passed - 1, len(CELERY_RETRY_INTERVALS) - 1)]
    return BUSY_MACHINE * (gap + CONNECT_SECONDS + READY_SECONDS)


def recovery_deadline(backlog: int, unconfirmed: int) -> float:
    """Seconds until everything a restart took with it is applied, once the worker consumes
    again with ``backlog`` messages ahead of it (queued, or still in the tracker's spool) and
    ``unconfirmed`` published batches (some lost) in the tracker's outbox.

    The tracker publishes a lost batch again ``CONFIRM_TIMEOUT`` after its publish, but only
    once the worker has no backlog (the queue is looked at again every
    ``BACKLOG_RECHECK_INTERVAL``), and ``REPLAY_CHUNK`` at a look of the ledger (every
    ``CONFIRM_POLL_INTERVAL``)."""
    drain = backlog / WORKER_SPARE_RATE
    looks = 1 + unconfirmed // REPLAY_CHUNK
    return BUSY_MACHINE * (
        drain + CONFIRM_TIMEOUT + BACKLOG_RECHECK_INTERVAL + looks * CONFIRM_POLL_INTERVAL
    )


def assert_same_worker(worker: CeleryProcess, pid: int) -> None:
    """The worker the scenario started is alive and was never replaced."""
    assert worker.process.pid == pid
    assert worker.process.poll() is None, f"the worker exited:\n{worker.log[-3000:]}"
    assert "Unrecoverable error" not in worker.log, worker.log[-3000:]


def stop_redis(server: PrivateRedis) -> None:
    """Shut the server down as an operator would: what it accepted is saved for the restart."""
    client = server.client()
    with contextlib.suppress(Exception):  # the connection drops as the server exits
        client.shutdown(save=True)  # type: ignore[attr-defined]
    assert server.process is not None
    server.process.wait(timeout=30)
    server.process = None


def _configuration(tmp_path: Path, url: str, broker: str) -> tuple[dict[str, str], Settings]:
    """The workers' environment and the agents' settings: same broker and database."""
    environment = service_environment(
        SESSIONS_BROKER_URL=broker,
        SESSIONS_DATABASE_URL=url,
        SESSIONS_SPOOL_DIR=str(tmp_path / "worker-spool"),
        SESSIONS_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY_SECONDS),
    )
    return environment, _settings(url, broker, tmp_path / "spool")


def _settings(url: str, broker: str, spool: Path) -> Settings:
    return agent_settings(
        broker,
        url,
        spool_dir=spool,
        visibility_timeout_seconds=VISIBILITY_SECONDS,
        confirm_timeout_seconds=CONFIRM_TIMEOUT,
    )


def test_redis_down_while_agents_record_is_spooled_and_replayed_to_exact_counts(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url = fault_database_url
    reference = Reference()
    outages = scaled(1)
    sessions = [f"broker-outage-{n}" for n in range(20)]
    with readme_pipeline(tmp_path, url, redis_server.url) as (settings, monitor, worker):
        pid = worker.process.pid
        assert settings.confirms_on_redis and settings.database_url != url
        tracker = SessionTracker(settings, max_batch_events=50, flush_interval=0.02)
        recorders, producers = recording_agents(tracker, reference, sessions, rate=250)
        outage_worst = 0.0
        spooled_in_outages = 0
        #: Seconds from Redis answering again to the first replayed batch / an empty spool.
        first_replay: list[float] = []
        drained: list[float] = []
        down_for = 0.0
        try:
            for _ in range(outages):
                applied = monitor.ledger_count()
                wait_until(
                    lambda applied=applied: monitor.ledger_count() >= applied + 5,  # type: ignore[misc]
                    # After an outage the worker is back when Celery's next try finds Redis.
                    timeout=reconnect_deadline(down_for),
                    message="batches being applied before the outage",
                )
                spooled = tracker.stats.events_spooled
                for recorder in recorders:
                    recorder.worst = 0.0  # from here on: the outage's worst call
                stop_redis(redis_server)
                stopped = time.monotonic()
                wait_until(
                    lambda spooled=spooled, stopped=stopped: (  # type: ignore[misc]
                        tracker.stats.events_spooled > spooled
                        and deadline_passed(stopped, OUTAGE_SECONDS)
                    ),
                    timeout=60,
                    message="batches spooled during the outage",
                )
                replayed = tracker.stats.events_replayed
                redis_server.start()
                restarted = time.monotonic()
                down_for = restarted - stopped
                outage_worst = max(outage_worst, *(r.worst for r in recorders))
                spooled_in_outages += tracker.stats.events_spooled - spooled
                wait_until(
                    lambda replayed=replayed: tracker.stats.events_replayed > replayed,  # type: ignore[misc]
                    timeout=60,
                    message="the first replay after the outage",
                )
                first_replay.append(time.monotonic() - restarted)
                wait_until(
                    lambda: tracker.stats.events_replayed >= tracker.stats.events_spooled,
                    timeout=60,
                    message="the spool replayed after the outage",
                )
                drained.append(time.monotonic() - restarted)
        finally:
            for producer in producers:
                producer.stop()  # raises if record() ever raised
        problem = settle(tracker, redis_server.client())
        tracker.close()
        stats = tracker.stats

        outcome = compare(reference, url)
        row = record_outcome("3a Redis down while recording", outcome, began)
        row.worst_record_us = outage_worst * 1e6
        row.dead_lettered = monitor.dead_letter_count()
        overall = max(recorder.worst for recorder in recorders)
        row.notes.append(
            f"{outages} outage(s) of >= {OUTAGE_SECONDS:g} s; {stats.events_spooled} events "
            f"spooled ({stats.batches_failed} batches), {stats.events_replayed} replayed, "
            f"{stats.events_lost} lost by the client, {stats.events_dropped} dropped; worst "
            f"record() after the outage began {overall * 1e6:,.0f} us; first replay "
            f"{', '.join(f'{t:.1f}' for t in first_replay)} s and spool empty "
            f"{', '.join(f'{t:.1f}' for t in drained)} s after Redis answered again; "
            f"worker pid {pid} throughout ({worker.count('Connection to broker lost')} "
            f"connection losses); {stats.batches_republished} batches published again for "
            "want of confirmation; agents without a database URL, confirming through Redis"
        )

        assert_same_worker(worker, pid)
        assert problem is None, problem
        assert spooled_in_outages > 0
        assert stats.events_lost == 0 and stats.events_dropped == 0, stats
        assert stats.events_replayed == stats.events_spooled, stats
        assert row.dead_lettered == 0
        assert outcome.exact, outcome.describe()


def test_a_tracker_closed_in_the_outage_leaves_its_batches_for_the_next_one(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url = fault_database_url
    environment, settings = _configuration(tmp_path, url, redis_server.url)
    reference = Reference()
    events = scaled(1000)
    sessions = [f"broker-restart-{n}" for n in range(10)]
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(concurrency=2)
        stop_redis(redis_server)
        first = SessionTracker(settings, max_batch_events=50, flush_interval=0.02)
        recorder = ReferenceRecorder(first, reference)
        for index in range(events):
            recorder.record(sessions[index % len(sessions)], index)
        first.close(timeout=30)
        left = first.stats
        spool_files = sorted(path.name for path in settings.spool_dir.glob("*"))
        redis_server.start()

        second = SessionTracker(settings, max_batch_events=50, flush_interval=0.02)
        try:
            wait_until(
                lambda: second.stats.events_replayed >= left.events_spooled,
                timeout=60,
                message="the new tracker to replay the spool of the closed one",
            )
            replayed = second.stats
            problem = settle(second, redis_server.client())
        finally:
            second.close()
        # flush(wait=True) watches only the batches the tracker itself published: the
        # replayed ones are awaited in the database directly.
        wait_until(
            lambda: compare(reference, url).applied >= reference.sent,
            timeout=60,
            message="the replayed events applied",
        )

        outcome = compare(reference, url)
        row = record_outcome("3b tracker closed in outage, restarted", outcome, began, recorder)
        row.dead_lettered = monitor.dead_letter_count()
        row.notes.append(
            f"closed tracker spooled {left.events_spooled} events in {left.batches_failed} "
            f"batches ({spool_files}); the next one replayed {replayed.events_replayed} in "
            f"{replayed.batches_replayed} batches"
        )

        assert worker.process.poll() is None, f"the worker exited:\n{worker.log[-3000:]}"
        assert problem is None, problem
        assert left.events_recorded == events and left.events_pending == 0, left
        assert left.events_sent == 0 and left.events_spooled == events, left
        assert left.events_lost == 0 and left.events_dropped == 0, left
        assert replayed.events_replayed == events, replayed
        assert outcome.exact, outcome.describe()
        assert row.dead_lettered == 0


def test_redis_killed_and_restarted_empty_while_agents_record_loses_nothing_and_keeps_the_worker(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url = fault_database_url
    reference = Reference()
    restarts = scaled(3)
    sessions = [f"broker-empty-{n}" for n in range(20)]
    with readme_pipeline(tmp_path, url, redis_server.url) as (settings, monitor, worker):
        pid = worker.process.pid
        tracker = SessionTracker(
            settings, max_batch_events=50, flush_interval=EMPTY_CASE_FLUSH_INTERVAL
        )
        recorders, producers = recording_agents(tracker, reference, sessions, rate=150)
        burst = ReferenceRecorder(tracker, reference)
        broker = redis_server.client()
        #: Per restart: messages seen queued (taken by no worker) just before the kill, seconds
        #: until the worker consumed again, seconds until everything recorded before the kill
        #: was applied, and batches published again by then.
        queued_at_kill: list[int] = []
        reconnected: list[float] = []
        recovered: list[float] = []
        republished: list[int] = []
        down_for = 0.0
        try:
            for round_number in range(restarts):
                applied = monitor.ledger_count()
                wait_until(
                    lambda applied=applied: monitor.ledger_count() >= applied + 5,  # type: ignore[misc]
                    timeout=reconnect_deadline(down_for),
                    message="batches being applied before the kill",
                )
                # A burst published while the worker's consumer is frozen (SIGSTOP, a stall
                # such as a long GC pause or a starved VM) waits in the queue, and the kill
                # takes it: messages no worker has seen, which only a republish brings back.
                # Without the stall, a worker that keeps up with the publisher takes each
                # message as it arrives, the queue can be empty at every look, and the kill
                # takes nothing of the kind (a CI run waited on it until pytest's timeout).
                first = round_number * BURST_EVENTS
                seen: list[int] = []

                def queued(broker: Any = broker, seen: list[int] = seen) -> bool:
                    seen.append(int(broker.llen("sessions.events")))
                    return seen[-1] > 0

                os.kill(pid, signal.SIGSTOP)
                try:
                    for index in range(first, first + BURST_EVENTS):
                        burst.record(sessions[index % len(sessions)], index)
                    tracker.flush()
                    wait_until(queued, timeout=30, message="messages queued, the consumer frozen")
                    queued_at_kill.append(seen[-1])
                    before = tracker.stats
                    losses = worker.count("Connection to broker lost")
                    connections = worker.count(r"Connected to redis://")
                    redis_server.stop()  # SIGKILL: no persistence, so it comes back empty
                finally:
                    os.kill(pid, signal.SIGCONT)
                killed = time.monotonic()
                wait_until(
                    lambda spooled=before.events_spooled, killed=killed: (  # type: ignore[misc]
                        tracker.stats.events_spooled > spooled
                        and deadline_passed(killed, KILLED_SECONDS)
                    ),
                    timeout=60,
                    message="batches spooled while Redis is dead",
                )
                redis_server.start()
                restarted = time.monotonic()
                down_for = restarted - killed
                broker = redis_server.client()
                persistence = broker.info("persistence")  # type: ignore[attr-defined]
                assert persistence["rdb_last_load_keys_loaded"] == 0, persistence

                def connected_again(connections: int = connections) -> bool:
                    assert_same_worker(worker, pid)  # fails at once, with its log, if it died
                    return worker.count(r"Connected to redis://") > connections

                wait_until(
                    connected_again,
                    timeout=reconnect_deadline(down_for),
                    message="the worker to connect to the restarted Redis",
                )
                assert worker.count("Connection to broker lost") > losses
                # Its retries had no limit (Celery's default, 100, ends the worker after some
                # 47 minutes of outage): the consumer's log says "(n/None)", not "(n/100)".
                assert worker.count(r"Trying again .*\(\d+/None\)") > 0, worker.log[-3000:]
                applied = monitor.ledger_count()
                wait_until(
                    lambda applied=applied: monitor.ledger_count() > applied,  # type: ignore[misc]
                    timeout=reconnect_deadline(0),
                    message="the worker applying batches again after the restart",
                )
                reconnected.append(time.monotonic() - restarted)
                now = tracker.stats
                backlog = int(broker.llen("sessions.events"))  # type: ignore[attr-defined]
                backlog += now.batches_failed - now.batches_replayed
                deadline = recovery_deadline(backlog, now.batches_unconfirmed)
                problem = settle(tracker, timeout=deadline)
                assert problem is None, f"restart {round_number + 1}: {problem}"
                recovered.append(time.monotonic() - restarted)
                republished.append(tracker.stats.batches_republished - before.batches_republished)
                assert_same_worker(worker, pid)
        finally:
            for producer in producers:
                producer.stop()  # raises if record() ever raised
        problem = settle(tracker, timeout=SETTLE_DEADLINE)
        tracker.close()
        stats = tracker.stats

        outcome = compare(reference, url)
        row = record_outcome("3c Redis SIGKILLed, restarted empty", outcome, began)
        row.worst_record_us = max(recorder.worst for recorder in recorders) * 1e6
        row.dead_lettered = monitor.dead_letter_count()
        row.notes.append(
            f"{restarts} kill(s) of >= {KILLED_SECONDS:g} s, each with "
            f"{', '.join(map(str, queued_at_kill))} messages seen queued and untaken just "
            f"before; worker pid {pid} throughout, consuming again "
            f"{', '.join(f'{t:.1f}' for t in reconnected)} s and everything recorded before "
            f"the kill applied {', '.join(f'{t:.1f}' for t in recovered)} s after Redis "
            f"answered; batches published again per restart {republished} "
            f"({stats.batches_republished} in all); {worker.count('Couldn.t ack')} "
            f"acknowledgements on a dead channel dropped; {stats.events_spooled} events "
            f"spooled, {stats.events_replayed} replayed"
        )

        assert_same_worker(worker, pid)
        assert problem is None, problem
        # The kills took messages no worker had taken with them: only a republish brought
        # them back (a queued message may also have been a copy, so not per restart).
        assert stats.batches_republished > 0, republished
        assert stats.events_lost == 0 and stats.events_dropped == 0, stats
        assert row.dead_lettered == 0
        assert outcome.exact, outcome.describe()


#: How a RabbitMQ outage ends the node, taken in turn: a crash first, then an orderly stop.
RABBITMQ_STOPS = ("kill", "stop")


def test_rabbitmq_killed_while_agents_record_loses_nothing_and_the_worker_lives_on(
    tmp_path: Path, fault_database_url: str, rabbitmq_server: PrivateRabbitMQ
) -> None:
    """Scenario 3a on RabbitMQ: the node SIGKILLed (and, in turn, stopped) several times.

    Unlike the Redis case, the broker is *crashed*: a confirmed message is on disk in a quorum
    queue, so nothing the tracker handed over may be lost, and it runs with republishing off
    (``confirm_timeout_seconds=0``) so that the broker and the spool alone must account for
    every event. The worker is started once and never restarted by the test.
    """
    began = time.monotonic()
    url = fault_database_url
    environment, settings = _configuration(tmp_path, url, rabbitmq_server.url())
    settings = settings.model_copy(update={"confirm_timeout_seconds": 0.0})
    reference = Reference()
    outages = scaled(3)
    sessions = [f"rabbitmq-outage-{n}" for n in range(20)]
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(concurrency=2)
        tracker = SessionTracker(settings, max_batch_events=50, flush_interval=0.02)
        recorders = [ReferenceRecorder(tracker, reference) for _ in range(2)]
        producers = [
            Producer(recorder, sessions[number::2], rate=250)
            for number, recorder in enumerate(recorders)
        ]
        for producer in producers:
            producer.start()
        outage_worst = 0.0
        spooled_in_outages = 0
        #: Seconds from the node answering again to an empty spool / the worker applying again.
        drained: list[float] = []
        resumed: list[float] = []
        try:
            for number in range(outages):
                applied = monitor.ledger_count()
                wait_until(
                    lambda applied=applied: monitor.ledger_count() >= applied + 5,  # type: ignore[misc]
                    # After an outage the worker reconnects with Celery's backoff (2 s, 4 s,
                    # ... up to 30 s between tries) and the node restarts its queues: allow it.
                    timeout=120,
                    message="batches being applied before the outage",
                )
                spooled = tracker.stats.events_spooled
                for recorder in recorders:
                    recorder.worst = 0.0  # from here on: the outage's worst call
                how = RABBITMQ_STOPS[number % len(RABBITMQ_STOPS)]
                if how == "kill":
                    rabbitmq_server.kill()
                else:
                    rabbitmq_server.stop()
                stopped = time.monotonic()
                wait_until(
                    lambda spooled=spooled, stopped=stopped: (  # type: ignore[misc]
                        tracker.stats.events_spooled > spooled
                        and deadline_passed(stopped, OUTAGE_SECONDS)
                    ),
                    timeout=60,
                    message="batches spooled during the outage",
                )
                rabbitmq_server.start()
                restarted = time.monotonic()
                outage_worst = max(outage_worst, *(r.worst for r in recorders))
                spooled_in_outages += tracker.stats.events_spooled - spooled
                wait_until(
                    lambda: tracker.stats.events_replayed >= tracker.stats.events_spooled,
                    timeout=60,
                    message="the spool replayed after the outage",
                )
                drained.append(time.monotonic() - restarted)
                applied = monitor.ledger_count()
                wait_until(
                    lambda applied=applied: monitor.ledger_count() > applied,  # type: ignore[misc]
                    timeout=120,
                    message="the same worker applying batches again after the outage",
                )
                resumed.append(time.monotonic() - restarted)
                assert worker.process.poll() is None, (
                    f"the worker died in RabbitMQ outage {number + 1}:\n{worker.log[-3000:]}"
                )
        finally:
            for producer in producers:
                producer.stop()  # raises if record() ever raised
        broker = FaultBroker("amqp", rabbitmq_server.url(), rabbitmq=rabbitmq_server)
        problem = settle(tracker, broker)
        tracker.close()
        stats = tracker.stats

        outcome = compare(reference, url)
        row = record_outcome("3a RabbitMQ killed while recording", outcome, began)
        row.worst_record_us = outage_worst * 1e6
        row.dead_lettered = monitor.dead_letter_count()
        overall = max(recorder.worst for recorder in recorders)
        reconnects = worker.count("Connection to broker lost")
        row.notes.append(
            f"{outages} outage(s) of >= {OUTAGE_SECONDS:g} s "
            f"({', '.join(RABBITMQ_STOPS[n % 2] for n in range(outages))}); republishing off; "
            f"{stats.events_spooled} events spooled ({stats.batches_failed} batches), "
            f"{stats.events_replayed} replayed, {stats.events_lost} lost by the client, "
            f"{stats.events_dropped} dropped; worst record() after the outage began "
            f"{overall * 1e6:,.0f} us; spool empty {', '.join(f'{t:.1f}' for t in drained)} s "
            f"and the worker applying again {', '.join(f'{t:.1f}' for t in resumed)} s after "
            f"the node answered; worker pid {worker.process.pid} throughout, "
            f"{reconnects} broker connection losses logged"
        )

        assert worker.process.poll() is None, f"the worker exited:\n{worker.log[-3000:]}"
        assert problem is None, problem
        assert spooled_in_outages > 0
        assert stats.events_lost == 0 and stats.events_dropped == 0, stats
        assert stats.events_replayed == stats.events_spooled, stats
        assert row.dead_lettered == 0
        assert outcome.exact, outcome.describe()
