"""A RabbitMQ node that blocks publishers (a memory or disk alarm) holds up neither the
tracker's publishing nor its ``close``, and costs no event.

While a resource alarm is on, RabbitMQ stops reading the sockets of publishing connections,
and py-amqp's closing handshake waits for an answer that never comes. The tracker's publisher
dropped a connection after a failed publish with that handshake, with its lock held: its
thread hung until the alarm cleared, and ``SessionTracker.close`` (at exit, on SIGTERM) gave
up on it after 10 s with the buffered events neither published nor spooled (found on
2026-12-07 with a private node on a nearly full disk).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from kombu import Connection

from sessions.client_settings import ClientSettings
from sessions.tracker import SessionTracker
from tests.faults.servers import PrivateRabbitMQ
from tests.support.workers_harness import wait_until

#: Seconds a batch the node does not read takes to be given up: the tracker's three attempts,
#: each up to three kombu tries waiting 5 s for the confirm (``AMQP_CONFIRM_TIMEOUT``), about
#: 45 s, with room for a busy machine.
PUBLISH_DEADLINE = 120.0


def _alarm(node: PrivateRabbitMQ, state: str) -> bool:
    return f"memory resource limit alarm {state}" in node.log_tail(characters=1_000_000)


def test_a_node_blocking_publishers_holds_up_neither_publishing_nor_close(
    tmp_path: Path, rabbitmq_server: PrivateRabbitMQ
) -> None:
    settings = ClientSettings(
        broker_url=rabbitmq_server.url(), confirm_timeout_seconds=0, spool_dir=tmp_path
    )
    tracker = SessionTracker(settings, flush_interval=0.02)
    tracker.record("blocked-1", 0.1)
    wait_until(lambda: tracker.stats.batches_sent == 1, message="the first batch published")

    rabbitmq_server.ctl("set_vm_memory_high_watermark", "0.0000001")
    wait_until(lambda: _alarm(rabbitmq_server, "set"), message="the node's memory alarm")
    tracker.record("blocked-1", 0.2)
    tracker.record("blocked-1", 0.3)
    wait_until(
        lambda: tracker.stats.batches_failed >= 1,
        timeout=PUBLISH_DEADLINE,
        message="the publish the node does not read to fail (not to hang)",
    )
    closer = threading.Thread(target=tracker.close, name="closing-the-tracker")
    closer.start()
    wait_until(
        lambda: not closer.is_alive(),
        timeout=PUBLISH_DEADLINE,
        message="SessionTracker.close to return while the node blocks publishers",
    )
    stats = tracker.stats
    assert stats.events_lost == 0 and stats.events_dropped == 0, stats
    assert stats.events_spooled + stats.events_spilled >= 2, stats

    rabbitmq_server.ctl("set_vm_memory_high_watermark", "0.4")
    wait_until(lambda: _alarm(rabbitmq_server, "cleared"), message="the alarm cleared")
    replaying = SessionTracker(settings, flush_interval=0.02)
    try:
        wait_until(
            lambda: replaying.stats.events_replayed == 2,
            timeout=PUBLISH_DEADLINE,
            message="the spooled events published once the alarm cleared",
        )
    finally:
        replaying.close()
    # In the queue: the first batch and the replayed ones. The node also reads what the
    # timed-out publishes had left in their sockets once the alarm clears: copies of the same
    # batches (same ids), which the workers' ledger drops.
    wait_until(
        lambda: rabbitmq_server.messages("/") >= 3,
        message="the first batch and the replayed ones in the queue",
    )
    batches = _batches_in_queue(rabbitmq_server)
    assert sorted(time for times in batches.values() for time in times) == [0.1, 0.2, 0.3]


def _batches_in_queue(node: PrivateRabbitMQ) -> dict[str, tuple[float, ...]]:
    """The processing times of each distinct batch in the ingest queue, by batch id (taken
    off the queue; a copy must carry what its first did)."""
    batches: dict[str, tuple[float, ...]] = {}
    with Connection(node.url()) as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue="sessions.events", no_ack=True)) is not None:
            batch = json.loads(json.loads(message.body)[0][0])
            times = tuple(event["processing_time"] for event in batch["events"])
            assert batches.setdefault(batch["batch_id"], times) == times  # a copy, if repeated
    return batches
