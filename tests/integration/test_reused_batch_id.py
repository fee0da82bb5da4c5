"""A batch id in the ledger with other events: set aside and made visible, never applied.

The same batch again (a redelivery, a spool replay, a republish, in whatever serialisation the
client made) stays a silent duplicate; other content under a claimed id is a client bug that
would otherwise lose data unseen. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import select, update

from sessions.batch_digest import DIGEST_VERSION, content_digest
from sessions.database import upgrade_schema
from sessions.decoding import decode_batch
from sessions.events import Batch
from sessions.plain import batch_json, plain_record, record_event
from sessions.rules import check_id
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import ledger_table
from sessions.worker import metrics, tasks
from tests.integration.support import create, record, record_message


def requests(store: SessionStore, session_id: str) -> int:
    found = store.get(session_id)
    return 0 if found is None else found.request_count


def first_batch(batch_id: uuid.UUID) -> Batch:
    return Batch(
        batch_id=batch_id,
        events=(
            create("s-1", 0, user_id="u-1", metadata={"b": 1, "a": {"y": 2, "x": 1}}),
            record("s-1", 1, processing_time=0.25, input_tokens=3),
            record("s-1", 2, processing_time=1.0, error=True),
        ),
    )


def test_the_same_batch_in_any_serialisation_is_a_silent_duplicate(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    batch = first_batch(uuid.uuid4())
    message = batch.to_message()
    assert store.apply(message).applied == 3
    reordered = json.loads(json.dumps(message))
    reordered["events"][0]["metadata"] = {"a": {"x": 1, "y": 2}, "b": 1}
    reordered["events"] = [dict(reversed(list(e.items()))) for e in reordered["events"]]
    with caplog.at_level(logging.WARNING, logger="sessions.store"):
        for copy in (message, json.dumps(message), reordered, batch):
            result = store.apply(copy)
            assert (result.duplicate, result.applied, result.rejected, result.reused) == (
                3,
                0,
                0,
                False,
            )
    assert requests(store, "s-1") == 2
    assert store.dead_letters() == []
    assert "batch_id_reused" not in caplog.text


def test_the_trackers_text_replayed_from_the_spool_is_a_duplicate(store: SessionStore) -> None:
    """A publish the tracker counted as failed (RabbitMQ's confirm timed out) may have reached
    the broker: its spooled copy, serialised another way, must then be a duplicate."""
    check_id("s-2")
    fields = [plain_record("s-2", 0.1 * n, n == 1, None, True, n, 0, 0.0) for n in range(4)]
    records = [item for item in fields if item is not None]
    batch_id = uuid.uuid4()
    assert store.apply(batch_json(batch_id, records)).applied == 4
    spooled = Batch(batch_id=batch_id, events=tuple(record_event(item) for item in records))
    text = json.dumps(spooled.to_message(), separators=(",", ":"))
    assert store.apply(text).duplicate == 4
    assert requests(store, "s-2") == 4 and store.dead_letters() == []


def test_other_events_under_a_claimed_id_are_set_aside_not_applied(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    batch_id = uuid.uuid4()
    store.apply(first_batch(batch_id))
    other = Batch(batch_id=batch_id, events=(record("s-1", 3), record("s-9", 3))).to_message()
    with caplog.at_level(logging.WARNING, logger="sessions.store"):
        result = store.apply(other)
    assert result.reused and (result.applied, result.duplicate, result.rejected) == (0, 0, 1)
    assert result.rejected_by_reason == {"batch_id_reused": 1}
    assert requests(store, "s-1") == 2 and store.get("s-9") is None  # nothing applied
    (letter,) = store.dead_letters()
    assert letter.batch_id == str(batch_id)
    assert letter.reason.startswith(f"batch_id_reused: batch {batch_id} was applied before")
    assert "s-9" in letter.payload  # the batch set aside is the new one, whole
    (line,) = [r for r in caplog.records if "batch_id_reused" in r.getMessage()]
    assert line.levelno == logging.WARNING and str(batch_id) in line.getMessage()
    # Its own redelivery is set aside again: the ledger still holds the first content.
    assert store.apply(other).reused
    assert store.apply(first_batch(batch_id)).duplicate == 3


def test_an_id_claimed_before_digests_is_taken_for_a_redelivery(store: SessionStore) -> None:
    """Ledger rows from before revision 0006 have no digest: nothing to compare, so a batch
    under their id is a duplicate, as every such batch was before."""
    batch_id = uuid.uuid4()
    store.apply(first_batch(batch_id))
    with store.engine.begin() as connection:
        connection.execute(
            update(ledger_table)
            .where(ledger_table.c.batch_id == batch_id)
            .values(content_digest=None)
        )
    result = store.apply(Batch(batch_id=batch_id, events=(record("s-1", 5),)))
    assert (result.duplicate, result.reused) == (1, False)
    assert store.dead_letters() == []


def test_the_ledger_keeps_the_digest_of_what_it_claimed(store: SessionStore) -> None:
    batch = first_batch(uuid.uuid4())
    store.apply(batch)
    with store.engine.connect() as connection:
        stored = connection.execute(
            select(ledger_table.c.content_digest).where(ledger_table.c.batch_id == batch.batch_id)
        ).scalar_one()
    assert stored == content_digest(decode_batch(batch, 10_000))
    assert stored is not None and stored.startswith(f"{DIGEST_VERSION}:")


def test_a_payload_set_aside_whole_claims_its_content_too(store: SessionStore) -> None:
    """A payload the worker set aside (poison, say) is claimed with its digest: a copy of it is
    a duplicate, other events under its id a reused id."""
    message = record_message("s-3", events=2)
    store.dead_letter(message, "poison: redelivered unfinished 6 times")
    assert store.apply(message).duplicate == 2
    result = store.apply(
        Batch(batch_id=uuid.UUID(message["batch_id"]), events=(record("s-3", 1),)).to_message()
    )
    assert result.reused
    assert [letter.reason.split(":")[0] for letter in store.dead_letters()] == [
        "batch_id_reused",
        "poison",
    ]


def test_a_batch_applied_event_by_event_is_claimed_with_its_digest(store: SessionStore) -> None:
    """The path for values the database refuses claims the id the same way."""
    message: dict[str, Any] = record_message("s-4", events=2)
    message["events"][1]["input_tokens"] = 2**70  # beyond BIGINT: refused by the database
    first = store.apply(message)
    assert first.claimed and first.applied + first.rejected == 2
    again = store.apply(json.loads(json.dumps(message)))
    assert (again.duplicate, again.reused) == (2, False)


def test_the_worker_counts_a_reused_id_and_logs_it(
    task_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.WorkerMetrics(registry))
    batch_id = uuid.uuid4()
    tasks.ingest.run(first_batch(batch_id).to_message())
    tasks.ingest.run(first_batch(batch_id).to_message())
    result = tasks.ingest.run(Batch(batch_id=batch_id, events=(record("s-1", 9),)).to_message())
    assert result == {"applied": 0, "duplicate": 0, "rejected": 1}
    assert registry.get_sample_value("sessions_batches_reused_total") == 1
    assert registry.get_sample_value("sessions_batches_duplicate_total") == 1
    reused = {"reason": "batch_id_reused"}
    assert registry.get_sample_value("sessions_dead_letters_total", reused) == 1


def test_an_existing_ledger_migrates_to_digests(tmp_path: Any) -> None:
    """Revision 0006 on a ledger with rows: they keep their ids, without a digest."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade_schema(url, "0004")
    store = SessionStore(url, settings=Settings())
    batch_id = uuid.uuid4()
    try:
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO applied_batches (batch_id, applied_at) VALUES (?, ?)",
                (batch_id.hex, "2026-11-30 00:00:00.000000"),
            )
        upgrade_schema(url)
        assert store.apply(Batch(batch_id=batch_id, events=(record("s-5", 1),))).duplicate == 1
        fresh = store.apply(first_batch(uuid.uuid4()))
        assert fresh.claimed
    finally:
        store.dispose()
