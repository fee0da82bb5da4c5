"""The publisher tells the tracker how many messages wait in the ingest queue, on Redis and
on the embedded filesystem broker: the tracker republishes nothing while a backlog waits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessions.events import Batch, RecordEvent, utcnow
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from tests.services import require_redis
from tests.workers_harness import claimed_redis_db


@pytest.fixture(params=["redis", "filesystem"])
def broker_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "filesystem":
        yield Settings(broker_url="filesystem://", broker_dir=tmp_path / "broker")
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
