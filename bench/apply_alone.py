"""``store.apply()`` alone on a fresh PostgreSQL database, as JSON (not a test).

What one worker thread and one PostgreSQL backend do with ready batches (no broker), their
CPU per event, and how many updates of ``sessions`` rows PostgreSQL made HOT. With
``--explain``, one more batch's statements are replayed under ``EXPLAIN (ANALYZE, BUFFERS)``
in a transaction that is rolled back: where PostgreSQL's time per batch goes, statement by
statement. Only ``apply_only`` is taken from ``bench/ingest.py``, so the same file measures
an older source tree too (``cd <tree> && PYTHONPATH=. python <this file>``, without
``--explain``)::

    python -m bench.apply_alone                 # batches of 500 events over 1,000 sessions
    python -m bench.apply_alone --batch-events 2000 --explain
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlalchemy import create_engine, text

from bench.ingest import apply_only
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import temporary_postgres_database


def hot_update_fraction(url: str) -> float:
    """Of the updates of ``sessions`` rows so far, the fraction PostgreSQL made HOT (in place,
    no index entry written): 1.0 when no update changed an indexed column."""
    engine = create_engine(url)
    deadline = time.monotonic() + 10
    with engine.connect() as c:
        while True:  # the statistics of a backend that just exited arrive shortly after
            updated, hot = c.execute(
                text(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                    " WHERE relname = 'sessions'"
                )
            ).one()
            if updated or time.monotonic() > deadline:
                break
            c.rollback()
            time.sleep(0.1)
    engine.dispose()
    return hot / updated if updated else 0.0


def explain_one_batch(url: str, sessions: int, batch_size: int) -> list[dict[str, Any]]:
    """Each statement of applying one batch (onto the sessions already there): its first
    words, execution time in ms and shared buffers hit, as ``EXPLAIN ANALYZE`` reports."""
    from bench.ingest import wire_batches
    from bench.sweeps import captured_statements

    store = SessionStore(url, settings=Settings())
    with captured_statements(store.engine) as statements:
        store.apply(wire_batches(sessions, 1, batch_size)[0])
    found = []
    with store.engine.connect() as connection:
        cursor = connection.connection.cursor()
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE")):
                continue
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters)
            report = cursor.fetchone()[0][0]
            found.append(
                {
                    "statement": " ".join(statement.split())[:60],
                    "execution_ms": report["Execution Time"],
                    "planning_ms": report.get("Planning Time", 0.0),
                    "shared_hit_blocks": report["Plan"].get("Shared Hit Blocks", 0),
                }
            )
        connection.connection.rollback()
    store.dispose()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-events", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE one more batch")
    arguments = parser.parse_args()
    with temporary_postgres_database("sessions_bench_apply") as url:
        store = SessionStore(url, settings=Settings())
        store.upgrade()
        store.dispose()
        batches = max(20, arguments.events // arguments.batch_events)
        result: dict[str, Any] = dict(
            apply_only(url, arguments.sessions, batches, arguments.batch_events)
        )
        result["sessions_hot_update_fraction"] = hot_update_fraction(url)
        if arguments.explain:
            result["explain"] = explain_one_batch(url, arguments.sessions, arguments.batch_events)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
