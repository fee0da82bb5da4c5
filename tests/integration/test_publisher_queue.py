"""The publisher tells the tracker how many messages wait in the ingest queue, on Redis,
RabbitMQ and the embedded filesystem broker: the tracker republishes nothing while a backlog
waits. On RabbitMQ the look at a queue that does not exist yet must not break the publisher.
And what it publishes is what Celery's own ``send_task`` would have."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions.broker import (
    AMQP_CONFIRM_TIMEOUT,
    broker_connection,
    events_route,
    prepare_broker,
    publishing_config,
)
from sessions.events import Batch, RecordEvent, encode_message, utcnow
from sessions.publisher import INGEST_TASK, CeleryPublisher
from sessions.settings import Settings
from tests.support.services import rabbitmqctl, require_redis, temporary_rabbitmq_vhost
from tests.support.workers_harness import claimed_redis_db


@pytest.fixture(params=["redis", "amqp", "filesystem"])
def broker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "filesystem":
        yield Settings(broker_url="filesystem://", broker_dir=tmp_path / "broker")
        return
    if request.param == "amqp":
        with temporary_rabbitmq_vhost() as url:
            yield Settings(broker_url=url)
        return
    require_redis()
    with claimed_redis_db() as url:
        yield Settings(broker_url=url)


def _message() -> dict[str, object]:
    event = RecordEvent(session_id="s-1", at=utcnow())
    return Batch(batch_id=uuid.uuid4(), events=(event,)).to_message()


def test_queued_messages_counts_what_no_worker_has_taken(broker_settings: Settings) -> None:
    publisher = CeleryPublisher(broker_settings)
    try:
        assert publisher.queued_messages() == 0  # nothing ever published: no queue yet
        publisher(_message())  # declares the queue, as a worker would
        for _ in range(2):
            publisher(_message())
        assert publisher.queued_messages() == 3
    finally:
        publisher.close()


def test_on_rabbitmq_the_queues_are_quorum_queues_and_publishes_are_confirmed() -> None:
    with temporary_rabbitmq_vhost() as url:
        vhost = url.rsplit("/", 1)[1]
        publisher = CeleryPublisher(Settings(broker_url=url))
        try:
            publisher(_message())  # declares the queue and opens the publishing channel
            # The confirmed message is in the queue by the time the publish returns.
            assert publisher.queued_messages() == 1
            queues = rabbitmqctl(
                "list_queues", "-p", vhost, "name", "type", "durable", "--quiet",
                "--no-table-headers",
            ).splitlines()  # fmt: skip
            channels = rabbitmqctl(
                "list_channels", "vhost", "confirm", "--quiet", "--no-table-headers"
            )
        finally:
            publisher.close()
    assert "sessions.events\tquorum\ttrue" in queues, queues
    confirming = [line.split("\t")[1] for line in channels.splitlines() if line.startswith(vhost)]
    assert confirming == ["true"], channels


def _received(settings: Settings) -> list[Any]:
    """Every message in the ingest queue, taken off it (kombu's messages, decoded by kombu)."""
    messages = []
    with broker_connection(settings) as connection:
        queue = events_route(settings)[0](connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


def _comparable(message: Any) -> dict[str, object]:
    """What a worker reads of a message, without what differs between any two messages (ids,
    the publishing process) and without the broker's own delivery bookkeeping (RabbitMQ's
    properties hold the headers again, as ``application_headers``)."""
    per_message = {"id", "root_id", "origin", "argsrepr"}
    bookkeeping = {"correlation_id", "reply_to", "delivery_tag", "delivery_info"}
    properties = {
        k: v
        for k, v in message.properties.items()
        if k not in bookkeeping | {"application_headers"}
    }
    return {
        "headers": {k: v for k, v in message.headers.items() if k not in per_message},
        "properties": properties,
        "body": message.decode(),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "exchange": message.delivery_info.get("exchange"),
        "routing_key": message.delivery_info.get("routing_key"),
    }


#: The task id the publisher is given in the comparison below.
PUBLISHER_TASK_ID = "7d1c6a52-0d5e-4a43-9a53-8e7f1f6b2a10"


def test_the_publisher_sends_the_message_celerys_send_task_sends(broker_settings: Settings) -> None:
    """The client publishes through kombu alone; a worker must not be able to tell its
    message from the one a Celery app configured like the worker's sends (Celery 5.x)."""
    from celery import Celery

    text = encode_message(_message())
    app = Celery("reference", set_as_current=False)
    app.conf.update(publishing_config(broker_settings))
    prepare_broker(broker_settings)
    publisher = CeleryPublisher(broker_settings)
    try:
        app.send_task(INGEST_TASK, args=[text], confirm_timeout=AMQP_CONFIRM_TIMEOUT)
        publisher.send(text, task_id=PUBLISHER_TASK_ID)
        # Told apart by id, not by order: kombu's filesystem transport names a message
        # ``<monotonic ms>_<uuid4>`` and reads them sorted, so two sent in the same
        # millisecond come back in the order of their random uuids.
        received = _received(broker_settings)
        (from_publisher,) = [m for m in received if m.headers["id"] == PUBLISHER_TASK_ID]
        (from_celery,) = [m for m in received if m is not from_publisher]
    finally:
        publisher.close()
        app.close()
    assert _comparable(from_publisher) == _comparable(from_celery)
    assert from_publisher.headers["id"] == from_publisher.headers["root_id"]
    assert from_publisher.properties["correlation_id"] == PUBLISHER_TASK_ID
    assert from_publisher.headers["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"
    assert from_publisher.properties["reply_to"] == ""  # no result queue: nobody reads results
    assert from_publisher.decode()[0] == [text]
