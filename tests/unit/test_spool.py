"""The client's durable spool: order, durability, bounds, and loud overflow."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions import spool as spool_module
from sessions.spool import BatchSpool, SpillItem


def message(events: int = 2) -> dict[str, Any]:
    return {
        "batch_id": str(uuid.uuid4()),
        "events": [{"kind": "record", "session_id": f"s-{n}"} for n in range(events)],
    }


@pytest.fixture
def open_spool(tmp_path: Path) -> Iterator[Any]:
    opened: list[BatchSpool] = []

    def make(**bounds: Any) -> BatchSpool:
        bounds.setdefault("max_batches", 100)
        bounds.setdefault("max_bytes", 1_000_000)
        bounds.setdefault("max_age_seconds", 3600)
        spool = BatchSpool(tmp_path / "spool", **bounds)
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()


def test_batches_come_back_oldest_first_and_leave_when_removed(open_spool: Any) -> None:
    spool = open_spool()
    sent = [message() for _ in range(5)]
    for item in sent:
        assert spool.put(item)
    waiting = spool.oldest()
    assert [b.message for b in waiting] == sent
    assert [b.batch_id for b in waiting] == [m["batch_id"] for m in sent]
    spool.remove(waiting[0].seq)
    assert [b.message for b in spool.oldest(limit=2)] == sent[1:3]
    assert len(spool) == 4


def test_the_spool_survives_a_restart_and_is_shared_by_processes(open_spool: Any) -> None:
    first = open_spool()
    kept = message()
    first.put(kept)
    first.close()
    second, third = open_spool(), open_spool()
    assert [b.message for b in second.oldest()] == [kept]
    third.remove(second.oldest()[0].seq)
    assert len(second) == 0


def test_looking_into_a_spool_never_written_creates_no_file(open_spool: Any) -> None:
    # What every agent does before its first publish (earlier runs' batches go first).
    looker = open_spool()
    assert looker.claim(10, 30) == []
    assert looker.oldest() == []
    assert len(looker) == 0
    assert looker.stats().batches == 0
    assert looker.quarantined() == []
    assert not looker.path.exists()
    kept = message()
    assert open_spool().put(kept)  # another process spools: the file appears
    assert [b.message for b in looker.claim(10, 30)] == [kept]
    assert len(looker) == 1


def test_the_same_batch_is_kept_once(open_spool: Any) -> None:
    spool = open_spool()
    item = message()
    assert spool.put(item) and spool.put(item)
    assert len(spool) == 1


def test_a_full_spool_keeps_the_oldest_and_counts_the_overflow_loudly(
    open_spool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(max_batches=3)
    kept = [message() for _ in range(3)]
    for item in kept:
        assert spool.put(item)
    refused = message(events=7)
    with caplog.at_level(logging.ERROR, logger="sessions.spool"):
        assert not spool.put(refused)
    assert [b.message for b in spool.oldest()] == kept
    stats = spool.stats()
    assert (stats.batches, stats.overflowed_batches, stats.overflowed_events) == (3, 1, 7)
    assert any("is full" in r.message and refused["batch_id"] in r.message for r in caplog.records)


def test_the_byte_bound_refuses_what_does_not_fit(open_spool: Any) -> None:
    spool = open_spool(max_bytes=600)
    assert spool.put(message(events=3))
    assert not spool.put(message(events=30))
    assert spool.stats().overflowed_batches == 1 and len(spool) == 1


def test_batches_older_than_the_maximum_age_are_dropped_loudly(
    open_spool: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(max_age_seconds=60)
    old = message()
    spool.put(old)
    real_time = spool_module.time.time
    monkeypatch.setattr(spool_module.time, "time", lambda: real_time() + 3600)
    fresh = message()
    spool.put(fresh)
    with caplog.at_level(logging.ERROR, logger="sessions.spool"):
        assert [b.message for b in spool.oldest()] == [fresh]
    assert spool.stats().expired_batches == 1
    assert any("longer than" in r.message for r in caplog.records)


def _items(count: int, events: int = 2) -> list[SpillItem]:
    made = [message(events) for _ in range(count)]
    return [SpillItem(m["batch_id"], json.dumps(m), events) for m in made]


def test_put_texts_keeps_what_fits_in_order_and_refuses_the_rest_loudly(
    open_spool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(max_batches=3)
    assert spool.put_texts(_items(2)) == 2
    items = _items(3, events=5)
    with caplog.at_level(logging.ERROR, logger="sessions.spool"):
        assert spool.put_texts(items) == 1  # one more fits
    waiting = spool.oldest()
    assert [b.events for b in waiting] == [2, 2, 5]
    assert waiting[-1].text == items[0].text  # kept as given: replayed as it was spilled
    assert waiting[-1].message["batch_id"] == items[0].batch_id
    assert spool.stats().overflowed_events == 10
    logged = [r.getMessage() for r in caplog.records]
    assert any("2 batches" in m and "10 events NOT kept" in m for m in logged)


def test_put_texts_keeps_many_batches_at_once_each_dated_by_its_own_since(
    open_spool: Any,
) -> None:
    spool = open_spool(max_batches=1000)
    items = [
        SpillItem(item.batch_id, item.text, item.events, since=time.time() - 1000 + n)
        for n, item in enumerate(_items(2 * spool_module.ROWS_PER_INSERT + 5))
    ]
    assert spool.put_texts(items) == len(items)
    waiting = spool.oldest(limit=len(items))
    assert [b.batch_id for b in waiting] == [item.batch_id for item in items]
    assert [b.spooled_at for b in waiting] == [item.since for item in items]


def test_a_claimed_batch_is_left_alone_by_other_replayers_until_released_or_expired(
    open_spool: Any,
) -> None:
    mine, theirs = open_spool(), open_spool()  # two agent processes sharing one spool file
    mine.put_texts(_items(4))
    claimed = mine.claim(2, seconds=3600)
    assert [b.seq for b in claimed] == [b.seq for b in mine.oldest(2)]
    assert [b.seq for b in theirs.claim(10, seconds=3600)] == [b.seq for b in mine.oldest()[2:]]
    assert theirs.claim(10, seconds=3600) == []  # everything is being replayed by someone
    mine.release(claimed[1].seq)  # could not publish it: anyone's again
    assert [b.seq for b in theirs.claim(10, seconds=3600)] == [claimed[1].seq]
    mine.remove(claimed[0].seq)
    assert len(mine) == 3


def test_a_claim_that_was_never_released_runs_out(open_spool: Any) -> None:
    died, survivor = open_spool(), open_spool()
    died.put_texts(_items(1))
    assert len(died.claim(1, seconds=-1.0)) == 1  # a claim already run out, as after a crash
    assert len(survivor.claim(1, seconds=3600)) == 1


def test_a_spool_file_from_before_the_event_and_claim_columns_still_replays(
    tmp_path: Path,
) -> None:
    old = message(events=3)
    path = tmp_path / "spool" / spool_module.SPOOL_FILE.format(key="default")
    path.parent.mkdir()
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE spooled_batches (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " batch_id TEXT NOT NULL UNIQUE, message TEXT NOT NULL, size INTEGER NOT NULL,"
            " spooled_at REAL NOT NULL)"
        )
        connection.execute(
            "INSERT INTO spooled_batches (batch_id, message, size, spooled_at) VALUES (?,?,?,?)",
            (old["batch_id"], json.dumps(old), 10, time.time()),
        )
    spool = BatchSpool(path.parent, max_batches=10, max_bytes=10**6, max_age_seconds=3600)
    try:
        claimed = spool.claim(10, seconds=60)
        assert [(b.batch_id, b.events, b.message) for b in claimed] == [(old["batch_id"], 3, old)]
    finally:
        spool.close()


def _insert_raw(spool: BatchSpool, batch_id: str, text: str | bytes) -> None:
    """A row as a damaged file (or a buggy writer) could hold it, beside the good ones."""
    len(spool)  # opens the file, with its tables
    with sqlite3.connect(spool.path) as connection:
        connection.execute(
            "INSERT INTO spooled_batches (batch_id, message, size, spooled_at, events)"
            " VALUES (?, CAST(? AS TEXT), 10, ?, 1)",
            (batch_id, text, time.time()),
        )


#: Rows no replay could ever publish, and why each is set aside.
UNREADABLE = {
    "not UTF-8": (b'{"batch_id":"%s","events":[{"note":"\xff\xfe"}]}', "not UTF-8 text"),
    "not JSON": (b'{"batch_id":"%s","events":[{"kind":', "not a JSON document"),
    "another batch's text": (b'{"batch_id":"x-%s","events":[]}', "not the text of batch"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_a_spooled_batch_that_cannot_be_read_is_quarantined_and_the_others_replayed(
    open_spool: Any, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    spool = open_spool()
    before, after = message(), message()
    spool.put(before)
    bad_id = str(uuid.uuid4())
    text, reason = UNREADABLE[case]
    _insert_raw(spool, bad_id, text.replace(b"%s", bad_id.encode()))
    spool.put(after)
    with caplog.at_level(logging.ERROR, logger="sessions.spool"):
        claimed = spool.claim(10, seconds=60)
    assert [b.message for b in claimed] == [before, after]
    assert spool.stats().quarantined_batches == 1 and len(spool) == 2
    assert spool.claim(10, seconds=60) == []  # claimed already; the bad one never again
    spool.release(*(b.seq for b in claimed))
    assert [b.message for b in open_spool().oldest()] == [before, after]  # another process too
    (quarantined,) = spool.quarantined()
    assert quarantined.batch_id == bad_id and reason in quarantined.reason
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(bad_id in m and reason in m and "quarantined_batches" in m for m in logged), logged


def test_a_batch_the_publisher_cannot_send_is_quarantined_with_its_reason(open_spool: Any) -> None:
    spool = open_spool()
    spool.put(message())
    (waiting,) = spool.claim(1, seconds=60)
    spool.quarantine(waiting.seq, "UnserializableBatchError: surrogates not allowed")
    assert len(spool) == 0 and spool.claim(1, seconds=60) == []
    (quarantined,) = spool.quarantined()
    assert (quarantined.batch_id, quarantined.text) == (waiting.batch_id, waiting.text)
    assert quarantined.reason == "UnserializableBatchError: surrogates not allowed"
    stats = spool.stats()
    assert (stats.batches, stats.quarantined_batches) == (0, 1)


def test_quarantined_batches_expire_with_the_spools_maximum_age(
    open_spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(max_age_seconds=60)
    spool.put(message())
    spool.quarantine(spool.oldest()[0].seq, "bad")
    real_time = spool_module.time.time
    monkeypatch.setattr(spool_module.time, "time", lambda: real_time() + 3600)
    assert spool.claim(1, seconds=60) == [] and spool.stats().quarantined_batches == 0
