"""The publisher tells the tracker how many messages wait in the ingest queue, on Redis,
RabbitMQ and the embedded filesystem broker: the tracker republishes nothing while a backlog
waits. On RabbitMQ the look at a queue that does not exist yet must not break the publisher."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessions.events import Batch, RecordEvent, utcnow
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from tests.services import rabbitmqctl, require_redis, temporary_rabbitmq_vhost
from tests.workers_harness import claimed_redis_db


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
