"""Scenario 3: Redis stopped while agents keep recording, then started again.

The broker is a private ``redis-server`` of this test's own. Producer threads record through a
real :class:`SessionTracker` (its spool in a folder under ``tmp_path``) before, during and after
an outage of several seconds. ``record`` must never raise (its worst latency during the outage
is measured and reported, never asserted); the batches that could not be published go to the
spool and are replayed once Redis answers again; the database ends with exactly the events
sent. The server is shut down as an operator would (``SHUTDOWN SAVE``) so that the messages it
had already accepted survive the restart: what is under test is the client, not Redis's
durability (a server without persistence that is killed loses its queue, whatever any client
does).

On RabbitMQ (a private node of the test's own) the node is SIGKILLed and stopped in turn, with
the tracker's republishing off, and the worker is never restarted by the test: quorum queues
and publisher confirms must keep every message the broker took, the spool every one it did not.

A second case closes a tracker during the outage: its unsent batches stay in the spool, and a
new tracker (same spool folder, same broker URL: the same spool file) replays them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from sessions.settings import Settings
from sessions.tracker import SessionTracker
from tests.faults.harness import (
    Fleet,
    Monitor,
    Producer,
    Recorder,
    Reference,
    compare,
    deadline_passed,
    record_outcome,
    service_environment,
    settle,
    wait_until,
)
from tests.faults.report import scaled
from tests.faults.servers import FaultBroker, PrivateRabbitMQ, PrivateRedis

pytestmark = [pytest.mark.slow]

#: How long the broker stays down at least (it also stays down until batches were spooled).
OUTAGE_SECONDS = 5.0
#: Redis visibility timeout for the worker: a message it took before the outage and could not
#: acknowledge over the lost connection comes back this soon (the ledger drops a second copy).
VISIBILITY_SECONDS = 5
#: A batch the ledger still lacks this long after it was published is published again: a
#: worker that dies in a broker reconnect can take a batch it was receiving with it.
CONFIRM_TIMEOUT = 5.0


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
    return Settings(
        broker_url=broker,
        database_url=url,
        spool_dir=spool,
        visibility_timeout_seconds=VISIBILITY_SECONDS,
        confirm_timeout_seconds=CONFIRM_TIMEOUT,
    )


def test_redis_down_while_agents_record_is_spooled_and_replayed_to_exact_counts(
    tmp_path: Path, fault_database_url: str, redis_server: PrivateRedis
) -> None:
    began = time.monotonic()
    url = fault_database_url
    environment, settings = _configuration(tmp_path, url, redis_server.url)
    reference = Reference()
    outages = scaled(1)
    sessions = [f"broker-outage-{n}" for n in range(20)]
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(concurrency=2)
        worker_restarts = 0

        def supervise() -> None:
            """Restart the worker if it died, as systemd or a compose restart policy would.

            Celery 5.7's consumer can die on a broker restart ("Unrecoverable error:
            AttributeError: 'NoneType' object has no attribute 'hostname'" in
            on_connection_error_after_connected); that is reported, not hidden.
            """
            nonlocal worker, worker_restarts
            if worker.process.poll() is not None:
                worker_restarts += 1
                worker = fleet.worker(concurrency=2)

        tracker = SessionTracker(settings, max_batch_events=50, flush_interval=0.02)
        recorders = [Recorder(tracker, reference) for _ in range(2)]
        producers = [
            Producer(recorder, sessions[number::2], rate=250)
            for number, recorder in enumerate(recorders)
        ]
        for producer in producers:
            producer.start()
        outage_worst = 0.0
        spooled_in_outages = 0
        #: Seconds from Redis answering again to the first replayed batch / an empty spool.
        first_replay: list[float] = []
        drained: list[float] = []
        try:
            for _ in range(outages):
                applied = monitor.ledger_count()
                wait_until(
                    lambda applied=applied: (  # type: ignore[misc]
                        supervise() or monitor.ledger_count() >= applied + 5
                    ),
                    # After an earlier outage the worker reconnects with Celery's backoff
                    # (2 s, 4 s, ... up to 30 s between tries): allow for it.
                    timeout=120,
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
        supervise()
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
            f"worker restarted after dying in a broker reconnect: {worker_restarts} time(s); "
            f"{stats.batches_republished} batches published again for want of confirmation"
        )

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
        recorder = Recorder(first, reference)
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
        recorders = [Recorder(tracker, reference) for _ in range(2)]
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
