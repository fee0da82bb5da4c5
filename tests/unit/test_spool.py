"""The client's durable spool: order, durability, bounds, and loud overflow."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions import spool as spool_module
from sessions.spool import BatchSpool


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
