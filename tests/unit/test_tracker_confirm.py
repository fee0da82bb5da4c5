"""The tracker keeps each published batch until the ledger lists it, and publishes it again
when a worker lost it."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions import confirming, sending
from sessions.outbox import Outbox, Unconfirmed
from sessions.publisher import CallablePublisher
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker, open_spool
from tests.support.workers_harness import DEADLINE, wait_until
from tests.unit.test_tracker import NEVER

CONFIRM_TIMEOUT = 0.3


@pytest.fixture(autouse=True)
def quick_confirmations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confirming, "CONFIRM_POLL_INTERVAL", 0.02)
    monkeypatch.setattr(confirming, "CONFIRM_MIN_AGE", 0.0)
    monkeypatch.setattr(sending, "BACKLOG_RECHECK_INTERVAL", 0.02)
    monkeypatch.setattr(sending, "PUBLISH_RETRY_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(sending, "BROKER_DOWN_PAUSE", 0.05)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SessionStore]:
    store = SessionStore(f"sqlite:///{tmp_path / 'ledger.db'}", settings=Settings())
    store.upgrade()
    yield store
    store.dispose()


class LossyWorkers:
    """A stand-in broker and worker fleet: applies every message at once, except that the
    first delivery of each batch id in ``lose`` vanishes (a worker SIGKILLed holding it)."""

    def __init__(self, store: SessionStore, lose: int = 0) -> None:
        self.store = store
        self.lose = lose
        self.lost: list[str] = []
        self.published: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self.lock:
            self.published.append(message["batch_id"])
            if len(self.lost) < self.lose and message["batch_id"] not in self.lost:
                self.lost.append(message["batch_id"])
                return
        self.store.apply(message)


def _settings(**overrides: Any) -> Settings:
    overrides.setdefault("confirm_timeout_seconds", CONFIRM_TIMEOUT)
    return Settings(**overrides)


def test_a_batch_a_worker_lost_is_published_again_and_counted_once(
    store: SessionStore,
) -> None:
    workers = LossyWorkers(store, lose=1)
    with SessionTracker(
        _settings(), publisher=workers, store=store, flush_interval=NEVER, max_batch_events=10
    ) as tracker:
        for index in range(30):
            tracker.record(f"s-{index % 3}", processing_time=0.01, error=index % 10 == 0)
        tracker.flush(wait=True, timeout=DEADLINE)

        totals = store.aggregate()
        assert (totals.request_count, totals.error_count) == (30, 3)
        stats = tracker.stats
        assert (stats.batches_republished, stats.events_republished) == (1, 10)
        assert stats.batches_unconfirmed == 0
        # The copy went out under the same batch id as the lost one.
        assert workers.published.count(workers.lost[0]) == 2


def test_nothing_is_republished_while_the_queue_holds_a_backlog(store: SessionStore) -> None:
    workers = LossyWorkers(store, lose=1)
    backlog = [5]
    asked: list[int] = []

    class QueueAwarePublisher(CallablePublisher):
        def queued_messages(self) -> int:
            asked.append(backlog[0])
            return backlog[0]

    with SessionTracker(
        _settings(),
        publisher=QueueAwarePublisher(workers),
        store=store,
        flush_interval=NEVER,
        max_batch_events=10,
    ) as tracker:
        for _ in range(20):
            tracker.record("s-1")
        tracker.flush()
        wait_until(
            lambda: tracker.stats.batches_unconfirmed == 1 and len(workers.published) == 2,
            message="the lost batch, the only one unconfirmed",
        )
        # Overdue three times over, held back each time by the backlog: no copy.
        wait_until(lambda: len(asked) >= 3, message="three looks at the queue")
        assert tracker.stats.batches_republished == 0
        backlog[0] = 0  # the workers caught up
        tracker.flush(wait=True, timeout=DEADLINE)
        # The copy is applied (these workers apply inside the publish) a moment before the
        # publishing thread counts it: flush can see the ledger first.
        wait_until(lambda: tracker.stats.batches_republished == 1, message="one copy counted")
        assert tracker.stats.events_republished == 10


def test_a_republish_the_broker_refuses_is_kept_and_tried_again(store: SessionStore) -> None:
    workers = LossyWorkers(store, lose=1)
    refusals = [0]

    def flaky(message: dict[str, Any]) -> None:
        if workers.lost and message["batch_id"] == workers.lost[0] and refusals[0] < 4:
            refusals[0] += 1
            raise ConnectionError("broker down")
        workers(message)

    with SessionTracker(
        _settings(), publisher=flaky, store=store, flush_interval=NEVER, max_batch_events=10
    ) as tracker:
        for _ in range(20):
            tracker.record("s-1")
        tracker.flush(wait=True, timeout=DEADLINE)
        assert refusals[0] == 4  # refused, kept in the outbox, tried again until it went out
        assert tracker.stats.batches_republished == 1
    record = store.get("s-1")
    assert record is not None and record.request_count == 20


def test_a_copy_of_an_applied_batch_changes_nothing(store: SessionStore) -> None:
    """A slow worker applies the first copy after the second went out: the ledger drops one."""
    held: list[dict[str, Any]] = []

    def slow_then_fast(message: dict[str, Any]) -> None:
        if not held:
            held.append(message)
            return
        store.apply(message)

    with SessionTracker(
        _settings(), publisher=slow_then_fast, store=store, flush_interval=NEVER
    ) as tracker:
        for _ in range(5):
            tracker.record("s-1", processing_time=0.5)
        tracker.flush(wait=True, timeout=DEADLINE)
        # flush returned once the ledger showed the batch: the republished copy was applied
        # (asserted on the store, not on the publisher having returned: it may not have yet).
        first = store.get("s-1")
        assert len(held) == 1 and first is not None and first.request_count == 5
        store.apply(held[0])  # the first copy, late

    record = store.get("s-1")
    assert record is not None and record.request_count == 5


def test_unconfirmed_batches_go_to_the_spool_at_close_and_the_next_run_sends_them(
    store: SessionStore,
) -> None:
    nowhere: list[dict[str, Any]] = []  # published, then lost with the worker
    first = SessionTracker(
        _settings(confirm_timeout_seconds=3600),
        publisher=nowhere.append,
        store=store,
        flush_interval=NEVER,
        max_batch_events=4,
    )
    before = time.time()
    for index in range(8):
        first.record("s-1", processing_time=index / 100)
    first.flush()
    wait_until(lambda: len(nowhere) == 2, message="two batches published")
    published_by = time.time()
    first.close()
    spool = open_spool(Settings())
    assert spool is not None
    spooled = spool.oldest()
    assert sorted(b.batch_id for b in spooled) == sorted(m["batch_id"] for m in nowhere)
    # Dated by their first publish, not by the close: their age keeps counting from there.
    assert all(before <= b.spooled_at <= published_by for b in spooled)

    workers = LossyWorkers(store)
    with SessionTracker(_settings(), publisher=workers, store=store) as second:
        wait_until(lambda: second.stats.batches_replayed == 2, message="the replay")
        second.flush(wait=True, timeout=DEADLINE)
    record = store.get("s-1")
    assert record is not None and record.request_count == 8
    assert len(spool) == 0


def test_without_the_ledger_nothing_is_republished_and_recording_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = Settings(
        confirm_timeout_seconds=CONFIRM_TIMEOUT,
        database_url=f"sqlite:///{tmp_path / 'no.db'}",  # no worker has created it
    )
    published: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING, logger="sessions.tracker"):
        tracker = SessionTracker(
            unreachable, publisher=published.append, flush_interval=NEVER, max_batch_events=5
        )
        for index in range(10):
            tracker.record("s-1", processing_time=index)
        wait_until(lambda: "cannot read the ledger" in caplog.text, message="the ledger warning")
        # Past the confirm timeout, still only the two original publishes.
        wait_until(
            lambda: (
                caplog.text.count("cannot read the ledger") == 1
                and tracker.stats.batches_unconfirmed == 2
            ),
            message="two unconfirmed batches",
        )
        assert tracker.stats.batches_republished == 0 and len(published) == 2
        tracker.close()
    assert not (tmp_path / "no.db").exists()  # looking left no empty database behind
    # Nothing told a lost batch from an applied one: no copies were put in the spool.
    assert tracker.stats.batches_spooled_unconfirmed == 0
    spool = open_spool(unreachable)
    assert spool is not None and len(spool) == 0


def test_confirm_timeout_zero_keeps_no_batch_text(store: SessionStore) -> None:
    published: list[dict[str, Any]] = []
    with SessionTracker(
        _settings(confirm_timeout_seconds=0),
        publisher=published.append,
        store=store,
        flush_interval=NEVER,
    ) as tracker:
        tracker.record("s-1")
        tracker.flush()
        wait_until(lambda: len(published) == 1, message="the publish")
        assert not tracker._confirmations.looking  # no confirming thread
        assert all(entry.message is None for entry in tracker._confirmations.unconfirmed())


# -- the outbox on its own --------------------------------------------------------------------


def _entry(size: int = 10, seq: int = 1, at: float = 0.0) -> Unconfirmed:
    return Unconfirmed(uuid.uuid4(), seq, json.dumps({"x": size}), 5, size, at)


def test_the_outbox_forgets_the_oldest_beyond_its_count_and_byte_bounds() -> None:
    outbox = Outbox(republish_after=1.0, max_batches=3, max_bytes=100)
    entries = [_entry() for _ in range(4)]
    evicted = [outbox.add(entry) for entry in entries]
    assert evicted[:3] == [[], [], []] and evicted[3] == [entries[0]]
    assert list(outbox) == [e.batch_id for e in entries[1:]]
    big = _entry(size=95)
    assert outbox.add(big) == entries[1:4]  # the byte bound; the newest is always kept
    assert (list(outbox), outbox.forgotten) == ([big.batch_id], 4)


def test_the_wait_before_publishing_again_doubles() -> None:
    outbox = Outbox(republish_after=10.0, max_batches=10, max_bytes=10**6)
    entry = _entry(at=100.0)
    outbox.add(entry)
    assert outbox.overdue([entry.batch_id], now=109.0) == []
    assert outbox.overdue([entry.batch_id], now=110.0) == [entry]
    outbox.republished(entry, now=110.0)
    assert outbox.overdue([entry.batch_id], now=129.0) == []
    assert outbox.overdue([entry.batch_id], now=130.0) == [entry]
    outbox.confirm([entry.batch_id])
    assert outbox.overdue([entry.batch_id], now=1e9) == [] and len(outbox) == 0


def test_only_a_batch_overtaken_by_a_later_one_or_the_newest_is_republished() -> None:
    """Workers behind by more than the timeout get no copies: nothing later was applied."""
    outbox = Outbox(republish_after=1.0, max_batches=10, max_bytes=10**6)
    older, lost, later, newest = (_entry(at=0.0) for _ in range(4))
    for entry in (older, lost, later, newest):
        outbox.add(entry)
    missing = [older.batch_id, lost.batch_id, later.batch_id, newest.batch_id]
    # A fleet that is behind: nothing confirmed; only the newest may be copied.
    assert outbox.overdue(missing, now=5.0) == [newest]
    # ``later`` was applied: everything published before it and still missing was lost.
    outbox.confirm([later.batch_id])
    missing.remove(later.batch_id)
    assert outbox.overdue(missing, now=5.0) == [older, lost, newest]
    # The copy is the newest publish now; ``newest``, overtaken by nothing applied, waits.
    outbox.republished(lost, now=5.0)
    assert outbox.overdue(missing, now=100.0) == [older, lost]


def test_a_batch_older_than_the_max_age_is_forgotten_not_copied() -> None:
    """The ledger forgets applied batches after its retention: a late copy could count twice."""
    outbox = Outbox(republish_after=1.0, max_batches=10, max_bytes=10**6, max_age=100.0)
    old, newest = _entry(at=0.0), _entry(at=0.0)
    outbox.add(old)
    outbox.add(newest)
    outbox.republished(newest, now=50.0)  # a republish keeps the first publish's age
    assert outbox.overdue([old.batch_id, newest.batch_id], now=100.0) == [newest]
    assert outbox.overdue([old.batch_id, newest.batch_id], now=101.0) == []
    assert (len(outbox), outbox.forgotten) == (0, 2)


def test_flush_waits_for_batches_up_to_its_sequence_and_replayed_ones() -> None:
    outbox = Outbox(republish_after=1.0, max_batches=10, max_bytes=10**6)
    replayed, early, late = _entry(seq=0), _entry(seq=5), _entry(seq=9)
    for entry in (replayed, early, late):
        outbox.add(entry)
    assert outbox.ids_up_to(5) == {replayed.batch_id, early.batch_id}


def test_a_ledger_look_without_the_store_extra_says_so_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review of issue 13: an install without SQLAlchemy (a base install on RabbitMQ) got a bare
    ModuleNotFoundError from ``flush(wait=True)``; now an error naming the extra, not a wait."""
    from sessions.confirming import LedgerConfirmer
    from sessions.errors import StoreUnusableError

    monkeypatch.setitem(sys.modules, "sqlalchemy.exc", None)  # as if it were not installed
    confirmer = LedgerConfirmer(_settings())
    with pytest.raises(StoreUnusableError, match=r"needs the 'store' extra"):
        confirmer.applied({uuid.uuid4()})
    with SessionTracker(
        _settings(), publisher=lambda message: None, confirmer=confirmer, flush_interval=NEVER
    ) as tracker:
        tracker.record("s-1", processing_time=0.5)
        # Refused at once (waited out, it would be a FlushTimeoutError naming the last error).
        with pytest.raises(StoreUnusableError, match=r"pip install '\.\[store\]'"):
            tracker.flush(wait=True, timeout=DEADLINE)


def test_a_ledger_the_environment_cannot_open_is_refused_naming_the_variable(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of the client's settings: an agent reads only its own fields, so a store setting
    the environment breaks surfaced first at the ledger's look, as pydantic's raw error, read
    again at every look; now an error naming the variable and its rule, not a wait."""
    from sessions.client_settings import ClientSettings
    from sessions.confirming import LedgerConfirmer
    from sessions.errors import StoreUnusableError

    monkeypatch.setenv("SESSIONS_METRICS_PORT", "not-a-port")  # the worker's, not the agent's
    client = ClientSettings(database_url=store.url, confirm_timeout_seconds=CONFIRM_TIMEOUT)
    confirmer = LedgerConfirmer(client)
    with pytest.raises(StoreUnusableError, match="SESSIONS_METRICS_PORT") as caught:
        confirmer.applied({uuid.uuid4()})
    assert "not-a-port" not in str(caught.value)
    with SessionTracker(
        client, publisher=lambda message: None, confirmer=confirmer, flush_interval=NEVER
    ) as tracker:
        tracker.record("s-1", processing_time=0.5)
        with pytest.raises(StoreUnusableError, match="SESSIONS_METRICS_PORT"):
            tracker.flush(wait=True, timeout=DEADLINE)
