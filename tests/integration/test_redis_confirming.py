"""Confirmation through Redis (sessions.redis_confirming) against a private redis-server.

The worker's side (:class:`ConfirmationMarks`) and the agent's (:class:`RedisConfirmer`) meet
on a real server; a tracker with no database at all confirms through them, republishes a batch
a "worker" lost, and an empty restart of Redis costs nothing but a republish.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions import confirming, sending
from sessions.errors import BrokerUnavailableError
from sessions.redis_confirming import (
    MGET_CHUNK,
    ConfirmationMarks,
    RedisConfirmer,
    confirmation_key,
)
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.faults.servers import PrivateRedis, private_redis
from tests.support.workers_harness import wait_until


@pytest.fixture(scope="module")
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.fixture
def settings(redis_server: PrivateRedis, tmp_path: Path) -> Iterator[Settings]:
    redis_server.client().flushdb()  # type: ignore[attr-defined]
    yield Settings(broker_url=redis_server.url, spool_dir=tmp_path / "spool")


def test_a_marked_batch_is_confirmed_and_its_mark_lives_as_long_as_the_spool_keeps_it(
    settings: Settings, redis_server: PrivateRedis
) -> None:
    marked, unmarked = uuid.uuid4(), uuid.uuid4()
    ConfirmationMarks(settings).mark(marked)
    confirmer = RedisConfirmer(settings)
    try:
        assert confirmer.applied({marked, unmarked}) == {marked}
    finally:
        confirmer.close()
    ttl = redis_server.client().ttl(confirmation_key(marked))  # type: ignore[attr-defined]
    lifetime = settings.confirmation_ttl.total_seconds()
    assert lifetime - 60 < ttl <= lifetime


def test_the_ttl_setting_overrides_the_spool_age(
    settings: Settings, redis_server: PrivateRedis
) -> None:
    short = settings.model_copy(update={"confirmation_ttl_seconds": 120})
    batch = uuid.uuid4()
    ConfirmationMarks(short).mark(batch)
    assert 60 < redis_server.client().ttl(confirmation_key(batch)) <= 120  # type: ignore[attr-defined]


def test_more_ids_than_one_mget_takes_are_all_answered(settings: Settings) -> None:
    batches = [uuid.uuid4() for _ in range(MGET_CHUNK * 2 + 7)]
    marks = ConfirmationMarks(settings)
    for batch in batches[::3]:
        marks.mark(batch)
    confirmer = RedisConfirmer(settings)
    try:
        assert confirmer.applied(batches) == set(batches[::3])
        assert confirmer.applied([]) == set()
    finally:
        confirmer.close()


def test_marks_are_off_when_the_setting_says_so_or_the_broker_is_not_redis(
    settings: Settings, redis_server: PrivateRedis
) -> None:
    batch = uuid.uuid4()
    ConfirmationMarks(settings.model_copy(update={"broker_confirmations": False})).mark(batch)
    assert ConfirmationMarks(Settings()).enabled is False  # the filesystem broker
    assert redis_server.client().exists(confirmation_key(batch)) == 0  # type: ignore[attr-defined]


def test_redis_gone_fails_the_look_and_not_the_worker_and_an_empty_restart_forgets(
    settings: Settings, redis_server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    before = uuid.uuid4()
    marks = ConfirmationMarks(settings)
    marks.mark(before)
    confirmer = RedisConfirmer(settings)
    redis_server.stop()
    try:
        with pytest.raises(BrokerUnavailableError, match=r"confirmations on Redis at redis://"):
            confirmer.applied({before})
        with caplog.at_level(logging.WARNING, "sessions.redis_confirming"):
            marks.mark(uuid.uuid4())  # never raises: the batch is committed already
            marks.mark(uuid.uuid4())
        assert sum("cannot mark batch" in r.getMessage() for r in caplog.records) == 1
    finally:
        redis_server.start()  # no persistence: it comes back empty
    after = uuid.uuid4()
    with caplog.at_level(logging.WARNING, "sessions.redis_confirming"):
        marks.mark(after)
    assert "works again" in caplog.records[-1].getMessage()
    try:
        # The mark of `before` went with the server: its agent publishes it again (harmless).
        assert confirmer.applied({before, after}) == {after}
    finally:
        confirmer.close()


class MarkingWorkers:
    """A stand-in for the broker and a worker: applies each message to a SQLite store, then
    marks it on Redis as ``sessions.worker.tasks`` does; the first delivery of the first ``lose``
    batches vanishes (a worker SIGKILLed holding it)."""

    def __init__(self, store: SessionStore, marks: ConfirmationMarks, lose: int = 0) -> None:
        self.store, self.marks, self.lose = store, marks, lose
        self.lost: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self.lock:
            if len(self.lost) < self.lose and message["batch_id"] not in self.lost:
                self.lost.append(message["batch_id"])
                return
            self.store.apply(message)
            self.marks.mark(uuid.UUID(message["batch_id"]))


def test_a_tracker_without_a_database_confirms_and_republishes_through_redis(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(confirming, "CONFIRM_POLL_INTERVAL", 0.02)
    monkeypatch.setattr(confirming, "CONFIRM_MIN_AGE", 0.0)
    monkeypatch.setattr(sending, "BACKLOG_RECHECK_INTERVAL", 0.02)
    (tmp_path / "agent").mkdir()
    monkeypatch.chdir(tmp_path / "agent")  # where the default sqlite:///sessions.db would be
    # The agent's settings name no database: the default SQLite file, which must stay unmade.
    monkeypatch.delenv("SESSIONS_DATABASE_URL", raising=False)
    agent = Settings(
        broker_url=settings.broker_url,
        spool_dir=settings.spool_dir,
        confirm_timeout_seconds=0.3,
    )
    assert agent.database_url == Settings.model_fields["database_url"].default
    worker_side = Settings(database_url=f"sqlite:///{tmp_path / 'worker.db'}")
    store = SessionStore(worker_side.database_url, settings=worker_side)
    store.upgrade()
    workers = MarkingWorkers(store, ConfirmationMarks(settings), lose=2)
    try:
        with SessionTracker(agent, publisher=workers, max_batch_events=10, spool=None) as tracker:
            assert isinstance(tracker._confirmer, RedisConfirmer)
            for n in range(45):
                tracker.record(f"s-{n % 3}", processing_time=1.0)
            tracker.flush(wait=True, timeout=30)
            # flush(wait=True) returned: every event is in the database, the lost ones too.
            assert store.aggregate().request_count == 45
            assert len(workers.lost) == 2
            wait_until(lambda: tracker.stats.batches_unconfirmed == 0, message="all confirmed")
            assert tracker.stats.batches_republished >= 2
        assert not (tmp_path / "agent" / "sessions.db").exists()
    finally:
        store.dispose()
