"""``bench.histogram_in_row`` on SQLite: histogram rows against a JSON histogram in the row.

Historical since revision 0008, which adopted the in-row design: "today" here is the design
before it (``session_latency`` rows, written by the store code of that time), which this
bench drives through ``sessions.apply``'s internals of then. It no longer runs against this
tree; run it from a checkout before revision 0008 (commit a3b460d) to reproduce README,
Performance, item 5.

The same wire-form batches applied by ``SessionStore.apply`` to two SQLite files, alternately:
today's ``session_latency`` rows, and a ``latency`` text column of ``sessions`` holding the
run's histogram as a JSON object (``{"<bucket>": count}``), merged inside the fast path's one
upsert with SQLite's JSON functions (``json_patch`` of the counts the delta's buckets reach),
so that it is claimed and committed with the counters, under the same ledger. SQLite runs
in this process, so its CPU is the process's. Then the same checks as on PostgreSQL: every
run's histogram equal, the overview's histogram statement equal (and timed), a redelivered
batch changing nothing::

    python -m bench.histogram_in_row_sqlite                # batches of 2000 over 1,000 sessions

Prints JSON and writes ``bench/results/histogram-in-row-sqlite-<time>.json``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Connection, MetaData, Table, Text, create_engine, literal_column, or_
from sqlalchemy.dialects import sqlite

import sessions.apply as apply_module
from bench.histogram_in_row import summary, workload, write_result
from bench.ingest import TRUNCATE_OURS
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import sessions_table

#: ``sessions`` as the in-row variant has it: today's columns and ``latency``.
_IN_ROW_SESSIONS: Table = sessions_table.to_metadata(MetaData())
_IN_ROW_SESSIONS.append_column(Column("latency", Text))
#: The live row's histogram plus the inserted row's, bucket by bucket: the delta's buckets
#: with their sums, patched over the stored object (``json_patch`` keeps the other keys).
_MERGE = literal_column(
    "json_patch(coalesce(sessions.latency, '{}'), (SELECT json_group_object(key,"
    " coalesce(json_extract(sessions.latency, '$.\"' || key || '\"'), 0) + value)"
    " FROM json_each(excluded.latency)))"
)


def _upsert_records_in_row(
    connection: Connection, deltas: dict[str, apply_module.Delta]
) -> set[str]:
    """``sessions.apply.upsert_records`` on SQLite, with the histogram in the upsert."""
    rows = [
        {
            **row,
            "latency": json.dumps(latency)
            if (latency := deltas[row["session_id"]].latency)
            else None,
        }
        for row in apply_module._new_live_rows(deltas)
    ]
    upsert = sqlite.insert(_IN_ROW_SESSIONS).values(rows)
    excluded = upsert.excluded
    statement = upsert.on_conflict_do_update(
        index_elements=[_IN_ROW_SESSIONS.c.session_id],
        set_={**apply_module._additive_set(sessions_table, excluded), "latency": _MERGE},
        where=or_(sessions_table.c.run == 1, sessions_table.c.created_at <= excluded.created_at),
    ).returning(_IN_ROW_SESSIONS.c.session_id)
    written = set(connection.execute(statement).scalars())
    if written != set(deltas):
        raise NotImplementedError("the bench's batches only take the fast path")
    return written


@contextlib.contextmanager
def in_row_writes(in_row: bool) -> Iterator[None]:
    """``store.apply`` writes the histogram into the live row while the block runs."""
    if not in_row:
        yield
        return
    original = apply_module.upsert_records
    apply_module.upsert_records = _upsert_records_in_row
    try:
        yield
    finally:
        apply_module.upsert_records = original


#: Every live run's histogram, ``(session_id, bucket, count)``, by whether it is in the row.
HISTOGRAMS = {
    False: "SELECT l.session_id, l.bucket, l.count FROM session_latency l"
    " JOIN sessions s ON s.session_id = l.session_id AND s.run = l.run",
    True: "SELECT s.session_id, CAST(j.key AS INTEGER), j.value FROM sessions s,"
    " json_each(s.latency) j",
}
#: The dashboard overview's histogram statement, by whether the histogram is in the row.
OVERVIEW = {
    False: "SELECT s.status, l.bucket, sum(l.count) FROM session_latency l"
    " JOIN sessions s ON s.session_id = l.session_id AND s.run = l.run"
    " GROUP BY s.status, l.bucket",
    True: "SELECT s.status, CAST(j.key AS INTEGER), sum(j.value) FROM sessions s,"
    " json_each(s.latency) j GROUP BY s.status, CAST(j.key AS INTEGER)",
}


def apply_all(url: str, texts: list[str], batch_events: int, in_row: bool) -> dict[str, float]:
    """Apply ``texts`` to the emptied database (the first batch untimed)."""
    store = SessionStore(url, settings=Settings())
    with store.engine.begin() as c:
        for table in TRUNCATE_OURS.removeprefix("TRUNCATE ").split(","):
            c.exec_driver_sql(f"DELETE FROM {table.strip()}")
    with in_row_writes(in_row):
        store.apply(texts[0])
        cpu_before, started = time.process_time(), time.perf_counter()
        for message in texts[1:]:
            store.apply(message)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    store.dispose()
    events = (len(texts) - 1) * batch_events
    return {"events_per_second": events / elapsed, "process_us_per_event": cpu / events * 1e6}


def _read(url: str, statement: str) -> tuple[set[tuple[Any, ...]], float]:
    engine = create_engine(url)
    with engine.connect() as c:
        c.exec_driver_sql(statement).all()
        started = time.perf_counter()
        rows = {tuple(row) for row in c.exec_driver_sql(statement)}
        seconds = time.perf_counter() - started
    engine.dispose()
    return rows, seconds


def main() -> None:
    arguments, texts = workload(__doc__)
    variants = {"rows": False, "in row, json": True}
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as directory:
        urls = {v: f"sqlite:///{directory}/{i}.db" for i, v in enumerate(variants)}
        for variant, url in urls.items():
            store = SessionStore(url, settings=Settings())
            store.upgrade()
            store.dispose()
            if variants[variant]:
                engine = create_engine(url)
                with engine.begin() as c:
                    c.exec_driver_sql("ALTER TABLE sessions ADD COLUMN latency TEXT")
                    c.exec_driver_sql("ALTER TABLE session_runs ADD COLUMN latency TEXT")
                engine.dispose()
        for _ in range(arguments.repeat):
            for variant, url in urls.items():
                runs[variant].append(
                    apply_all(url, texts, arguments.batch_events, variants[variant])
                )
                print(variant, json.dumps(runs[variant][-1]), flush=True)
        histograms = {v: _read(url, HISTOGRAMS[variants[v]])[0] for v, url in urls.items()}
        overview = {v: _read(url, OVERVIEW[variants[v]]) for v, url in urls.items()}
        in_row_url = urls["in row, json"]
        before = _read(in_row_url, HISTOGRAMS[True])[0]
        store = SessionStore(in_row_url, settings=Settings())
        with in_row_writes(True):
            store.apply(texts[1])
        store.dispose()
        result: dict[str, Any] = {
            **summary("bench.histogram_in_row_sqlite", arguments, runs),
            "file_bytes": {
                v: Path(url.removeprefix("sqlite:///")).stat().st_size for v, url in urls.items()
            },
            "histogram_buckets": len(histograms["rows"]),
            "histograms_equal_to_rows": histograms["in row, json"] == histograms["rows"],
            "overview_histogram_equal_to_rows": overview["in row, json"][0] == overview["rows"][0],
            "overview_histogram_ms": {v: seconds * 1e3 for v, (_, seconds) in overview.items()},
            "redelivery_changes_nothing": _read(in_row_url, HISTOGRAMS[True])[0] == before,
        }
    write_result("histogram-in-row-sqlite", result)


if __name__ == "__main__":
    main()
