"""Eight processes apply 10,000 record events each to the same five sessions at once.

Every process also redelivers some of its own batches and some of its neighbour's (which
that neighbour applies at about the same time), so the ledger's dedupe races too. Every
counter must come out exact: additive SQL loses nothing and applies nothing twice.
Processing time and cost are multiples of 1/64, so their float sums are exact as well.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from sessions.events import Batch, RecordEvent
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.integration.support import DEADLINE, T0, ledger_ids, live_rows, run_rows
from tests.support.reference_model import COUNTERS
from tests.support.waiting import POLL, cpu_progress, wait_for

pytestmark = pytest.mark.postgres

PROCESSES = 8
EVENTS_PER_PROCESS = 10_000
BATCH_SIZE = 250
SESSIONS = tuple(f"user-{n}" for n in range(5))
NAMESPACE = uuid.UUID("7b0f3c52-3d7e-4a8e-9a51-2f6de1c8a001")


def planned_events(process: int) -> Iterator[RecordEvent]:
    """The events process ``process`` records: deterministic, so the parent can sum them."""
    for n in range(EVENTS_PER_PROCESS):
        yield RecordEvent(
            session_id=SESSIONS[(n + process) % len(SESSIONS)],
            at=T0 + timedelta(seconds=n),
            processing_time=((n * 7 + process) % 64) / 64,
            error=(n + process) % 7 == 0,
            input_tokens=n % 3,
            output_tokens=(n + process) % 5,
            cost=(n % 16) / 64,
        )


def planned_batches(process: int) -> list[Batch]:
    """The process's events in batches with ids any process can rebuild."""
    events = list(planned_events(process))
    return [
        Batch(
            batch_id=uuid.uuid5(NAMESPACE, f"{process}/{start}"),
            events=tuple(events[start : start + BATCH_SIZE]),
        )
        for start in range(0, len(events), BATCH_SIZE)
    ]


def run_process(url: str, process: int, start: Any, results: Any) -> None:
    """One agent-worker: wait for the others, then apply, redelivering as it goes."""
    try:
        store = SessionStore(url, settings=Settings())
        mine = planned_batches(process)
        neighbours = planned_batches((process + 1) % PROCESSES)
        applied = duplicate = 0
        start.wait(DEADLINE)
        for index, batch in enumerate(mine):
            deliveries = [batch]
            if index % 4 == 0:
                deliveries.append(batch)  # redelivered right away
            if index % 5 == 2:
                deliveries.append(neighbours[index])  # the neighbour's, racing it
            if index % 10 == 9:
                deliveries.append(mine[index // 2])  # an old one, much later
            for delivery in deliveries:
                result = store.apply(delivery)
                applied += result.applied
                duplicate += result.duplicate
        store.dispose()
        results.put((process, applied, duplicate, None))
    except BaseException as exc:
        results.put((process, 0, 0, repr(exc)))


def expected_totals() -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {sid: dict.fromkeys(COUNTERS, 0.0) for sid in SESSIONS}
    for process in range(PROCESSES):
        for event in planned_events(process):
            entry = totals[event.session_id]
            entry["request_count"] += 1
            entry["error_count"] += int(event.error)
            entry["total_processing_time"] += event.processing_time
            entry["input_tokens"] += event.input_tokens
            entry["output_tokens"] += event.output_tokens
            entry["cost"] += event.cost
    return totals


def test_eight_processes_with_redeliveries_count_every_event_once(
    pg_store: SessionStore,
) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    processes = [
        context.Process(target=run_process, args=(pg_store.url, n, start, results))
        for n in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    outcomes: list[Any] = []

    def reported() -> bool:
        with contextlib.suppress(queue.Empty):
            while len(outcomes) < len(processes):
                outcomes.append(results.get(timeout=POLL))
        return len(outcomes) == len(processes)

    try:
        wait_for(
            reported,
            "every process to report back",
            progress=cpu_progress(*(process.pid for process in processes if process.pid)),
        )
    finally:
        for process in processes:
            process.join(DEADLINE)
            if process.is_alive():
                process.kill()
    errors = [(n, error) for n, _, _, error in outcomes if error]
    assert errors == []
    assert all(process.exitcode == 0 for process in processes)

    batches = EVENTS_PER_PROCESS // BATCH_SIZE
    assert sum(applied for _, applied, _, _ in outcomes) == PROCESSES * EVENTS_PER_PROCESS
    redeliveries = sum(
        (index % 4 == 0) + (index % 5 == 2) + (index % 10 == 9) for index in range(batches)
    )
    assert sum(dup for _, _, dup, _ in outcomes) == PROCESSES * redeliveries * BATCH_SIZE

    rows = live_rows(pg_store)
    assert sorted(rows) == list(SESSIONS)
    counted = {sid: {name: row[name] for name in COUNTERS} for sid, row in rows.items()}
    assert counted == expected_totals()
    assert all(row["status"] == "active" and row["run"] == 1 for row in rows.values())
    assert all(row["created_at"] <= T0 + timedelta(seconds=4) for row in rows.values())
    assert all(
        row["last_activity"] >= T0 + timedelta(seconds=EVENTS_PER_PROCESS - 5)
        for row in rows.values()
    )
    assert run_rows(pg_store) == {}
    assert len(ledger_ids(pg_store)) == PROCESSES * batches
    assert pg_store.dead_letters() == []
