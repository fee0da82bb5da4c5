"""Today's histogram rows against the histogram in the live row, side by side (not a test).

Historical since revision 0008, which adopted the in-row design: "today" here is the design
before it (``session_latency`` rows, written by the store code of that time), which this
bench drives through ``sessions.apply``'s internals of then. It no longer runs against this
tree; run it from a checkout before revision 0008 (commit a3b460d) to reproduce README,
Performance, item 5.

Issue 15's first lever, built far enough to measure on PostgreSQL's fast path (records only,
which is what nearly every batch is): the same wire-form batches are applied by
``SessionStore.apply`` to two fresh databases, alternately, in one invocation:

* **rows** (today): each counted request upserts a ``(session, run, bucket)`` row of
  ``session_latency``, the fast path's second multi-row ``INSERT .. ON CONFLICT``;
* **in row**: the run's histogram is a ``bigint[]`` column of ``sessions``, merged inside the
  fast path's one upsert (``ON CONFLICT .. SET latency = session_latency_add(s.latency,
  excluded.latency)``), so it is claimed, locked and committed with the counters, under the
  same ledger: exactly-once as they are, and no second statement, table or index entry.

The representation (:func:`in_row_ddl`) is sparse pairs in one array, ``{-(b + 1), count, ...}``
for each bucket ``b`` with a request (the scheme of ``sessions.histogram`` unchanged): a
bucket slot is negative and a count positive, so ``array_position`` (C) finds a bucket
without a loop over the histogram, and the PL/pgSQL merge only loops over the delta's pairs
(one to three per session per batch here). A dense array merged slower in micro-benchmarks,
because its loop runs over the delta's whole span of buckets (README, Performance, item 5).

Reported per variant: events/s, CPU us per event of this process and of its PostgreSQL
backend, the fraction of ``sessions`` updates that were HOT, each as the median of
``--repeat`` runs with the variants alternated; then checks on the data both hold after the
last repeat (every run's histogram equal, bucket for bucket; a redelivered batch changes
nothing), the dashboard overview's histogram statement on each (timed, results equal), and
``EXPLAIN (ANALYZE, BUFFERS)`` of one more batch's statements::

    python -m bench.histogram_in_row                     # batches of 2000 over 1,000 sessions
    python -m bench.histogram_in_row --batch-events 500 --repeat 5

Prints JSON and writes ``bench/results/histogram-in-row-<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, text

import sessions.apply as apply_module
from bench.apply_alone import explain_one_batch
from bench.ingest import apply_texts, wire_batches
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import temporary_postgres_database

#: The variants measured, each in a database of its own: today's, and the histogram in the
#: row as an array of this element type (``int4`` halves the row's growth, and a bucket's
#: count above 2**31 - 1 would fail its batch with ``integer out of range``).
VARIANTS: dict[str, str | None] = {"rows": None, "in row, bigint": "bigint", "in row, int4": "int4"}


def in_row_ddl(element: str) -> list[str]:
    """The in-row variant's schema, on top of today's (revision 0007)."""
    return [statement.replace("bigint[]", f"{element}[]") for statement in _IN_ROW_DDL]


#: The merge function is revision 0008's own: the design this bench measured, as shipped.
_REVISION_0008 = importlib.import_module("sessions.migrations.versions.0008_latency_in_the_run_row")
_IN_ROW_DDL = (
    "ALTER TABLE sessions ADD COLUMN latency bigint[]",
    "ALTER TABLE session_runs ADD COLUMN latency bigint[]",
    _REVISION_0008.MERGE_FUNCTION,
)


@functools.cache
def _in_row_upsert(element: str) -> Any:
    """Today's fast-path upsert (``sessions.apply._PG_UPSERT``) with the ``latency`` column:
    made from its text, so that both variants apply the same rules to the counters."""
    sql = apply_module._PG_UPSERT.text
    replacements = [
        (
            "input_tokens, output_tokens, cost)\n    SELECT",
            "input_tokens, output_tokens, cost, latency)\n    SELECT",
        ),
        (
            "coalesce(d.output_tokens, 0), coalesce(d.cost, 0)\n",
            f"coalesce(d.output_tokens, 0), coalesce(d.cost, 0), CAST(d.latency AS {element}[])\n",
        ),
        ("CAST(:cost AS float8[]))", "CAST(:cost AS float8[]), CAST(:latency AS text[]))"),
        ("output_tokens, cost)\n    ON", "output_tokens, cost, latency)\n    ON"),
        (
            "ON CONFLICT (session_id) DO UPDATE SET\n",
            "ON CONFLICT (session_id) DO UPDATE SET\n"
            "        latency = session_latency_add(s.latency, excluded.latency),\n",
        ),
    ]
    for old, new in replacements:
        assert sql.count(old) == 1, f"_PG_UPSERT changed: {old!r}"
        sql = sql.replace(old, new)
    return text(sql)


def latency_literal(latency: dict[int, int]) -> str | None:
    """A delta's bucket counts as the in-row array's text: ``{-(b + 1),count,...}``."""
    if not latency:
        return None
    return "{" + ",".join(f"{-bucket - 1},{count}" for bucket, count in latency.items()) + "}"


def _upsert_records_in_row(
    element: str, connection: Connection, deltas: dict[str, apply_module.Delta]
) -> set[str]:
    """``sessions.apply._upsert_records_postgresql`` with the histogram in the upsert."""
    ordered = sorted(deltas)
    rows = [deltas[session_id] for session_id in ordered]
    columns: dict[str, list[Any]] = {
        "session_id": ordered,
        "user_id": [delta.user_id for delta in rows],
        "created_us": [apply_module._micros(delta.first_at) for delta in rows],
        "last_us": [apply_module._micros(delta.last_at) for delta in rows],
        **{name: [getattr(delta, name) for delta in rows] for name in apply_module.COUNTERS},
        "latency": [latency_literal(delta.latency) for delta in rows],
    }
    parameters = {name: apply_module._array_literal(v) for name, v in columns.items()}
    if connection.execute(_in_row_upsert(element), parameters).rowcount != len(ordered):
        raise NotImplementedError("the bench's batches only take the fast path")
    return set(ordered)


@contextlib.contextmanager
def in_row_writes(element: str | None) -> Iterator[None]:
    """``store.apply`` writes the histogram into the live row, an array of ``element``, while
    the block runs (``None``: as today, into ``session_latency``)."""
    if element is None:
        yield
        return
    original = apply_module._upsert_records_postgresql
    apply_module._upsert_records_postgresql = functools.partial(_upsert_records_in_row, element)
    try:
        yield
    finally:
        apply_module._upsert_records_postgresql = original


#: Every live run's histogram, ``(session_id, bucket, count)``, by whether it is in the row.
HISTOGRAMS = {
    False: "SELECT l.session_id, l.bucket, l.count FROM session_latency l"
    " JOIN sessions s ON s.session_id = l.session_id AND s.run = l.run",
    True: "SELECT s.session_id, -u.slot - 1, u.count"
    " FROM sessions s, LATERAL (SELECT latency[i] AS slot, latency[i + 1] AS count"
    " FROM generate_subscripts(s.latency, 1) AS i WHERE i % 2 = 1) AS u",
}
#: The dashboard overview's histogram statement (``sessions.dashboard.reads.by_status``), by
#: whether the histogram is in the row.
OVERVIEW = {
    False: "SELECT s.status, l.bucket, sum(l.count) FROM session_latency l"
    " JOIN sessions s ON s.session_id = l.session_id AND s.run = l.run"
    " GROUP BY s.status, l.bucket",
    True: "SELECT s.status, -u.slot - 1, sum(u.count)"
    " FROM sessions s, LATERAL (SELECT latency[i] AS slot, latency[i + 1] AS count"
    " FROM generate_subscripts(s.latency, 1) AS i WHERE i % 2 = 1) AS u"
    " GROUP BY s.status, -u.slot - 1",
}


def apply_all(
    url: str, texts: list[str], batch_events: int, element: str | None
) -> dict[str, float]:
    """``bench.ingest.apply_texts`` with the histogram written as ``element`` says
    (:func:`in_row_writes`)."""
    with in_row_writes(element):
        return apply_texts(url, texts, batch_events)


def _read(url: str, statement: str) -> tuple[set[tuple[Any, ...]], float]:
    engine = create_engine(url)
    with engine.connect() as c:
        c.execute(text(statement)).all()  # warm the cache, as the dashboard's second view
        started = time.perf_counter()
        rows = {tuple(row) for row in c.execute(text(statement))}
        seconds = time.perf_counter() - started
    engine.dispose()
    return rows, seconds


def redelivery_changes_nothing(url: str, batch: str, element: str) -> bool:
    """Applying an already applied batch again leaves every histogram as it was."""
    before, _ = _read(url, HISTOGRAMS[True])
    store = SessionStore(url, settings=Settings())
    with in_row_writes(element):
        store.apply(batch)
    store.dispose()
    after, _ = _read(url, HISTOGRAMS[True])
    return before == after


def merge_function_time(url: str) -> dict[str, float]:
    """Calls of ``session_latency_add`` since the database's statistics began, and their
    time per call in microseconds (``track_functions``): the merge's share of the upsert."""
    engine = create_engine(url)
    with engine.connect() as c:
        calls, total_ms = c.execute(
            text(
                "SELECT calls, total_time FROM pg_stat_user_functions"
                " WHERE funcname = 'session_latency_add'"
            )
        ).one()
    engine.dispose()
    return {"calls": calls, "us_per_call": total_ms * 1e3 / calls if calls else 0.0}


def table_sizes(url: str) -> dict[str, int]:
    """Bytes of ``sessions`` and ``session_latency``, each with its indexes."""
    engine = create_engine(url)
    with engine.connect() as c:
        sizes = {
            name: int(c.execute(text(f"SELECT pg_total_relation_size('{name}')")).scalar_one())
            for name in ("sessions", "session_latency")
        }
    engine.dispose()
    return sizes


#: Batches replayed under ``EXPLAIN ANALYZE`` per variant; each statement's median is kept.
EXPLAINED_BATCHES = 5


def explained(
    url: str, element: str | None, sessions: int, batch_events: int
) -> list[dict[str, Any]]:
    """``bench.apply_alone.explain_one_batch`` of :data:`EXPLAINED_BATCHES` more batches:
    per statement, the medians of its execution time (ms) and shared buffers hit."""
    found: dict[str, list[dict[str, Any]]] = {}
    with in_row_writes(element):
        for _ in range(EXPLAINED_BATCHES):
            for report in explain_one_batch(url, sessions, batch_events):
                found.setdefault(report["statement"], []).append(report)
    return [
        {
            "statement": statement,
            "batches": len(reports),
            **{
                key: statistics.median(r[key] for r in reports)
                for key in ("execution_ms", "planning_ms", "shared_hit_blocks")
            },
        }
        for statement, reports in found.items()
    ]


def workload(doc: str) -> tuple[argparse.Namespace, list[str]]:
    """The command line's arguments (``doc``'s first paragraph describes the command) and
    the wire-form batches they ask for."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--batch-events", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    batches = max(20, arguments.events // arguments.batch_events)
    return arguments, wire_batches(arguments.sessions, batches, arguments.batch_events)


def summary(
    module: str, arguments: argparse.Namespace, runs: dict[str, list[dict[str, float]]]
) -> dict[str, Any]:
    """The command that ran, when, how many events each run timed, every run and the
    medians per variant."""
    batches = max(20, arguments.events // arguments.batch_events)
    return {
        "command": f"python -m {module} --batch-events {arguments.batch_events}"
        f" --sessions {arguments.sessions} --events {arguments.events}"
        f" --repeat {arguments.repeat}",
        "at": datetime.now(UTC).isoformat(),
        "events": (batches - 1) * arguments.batch_events,
        "runs": runs,
        "median": {
            variant: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for variant, results in runs.items()
        },
    }


def write_result(name: str, result: dict[str, Any]) -> None:
    """Save ``result`` as ``bench/results/<name>-<time>.json`` and print it but its runs."""
    path = Path(__file__).parent / "results" / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"wrote {path}")


def main() -> None:
    arguments, texts = workload(__doc__)
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with contextlib.ExitStack() as stack:
        urls = {
            variant: stack.enter_context(temporary_postgres_database("sessions_bench_hist"))
            for variant in VARIANTS
        }
        for variant, url in urls.items():
            store = SessionStore(url, settings=Settings())
            store.upgrade()
            store.dispose()
            element = VARIANTS[variant]
            if element is not None:
                with create_engine(url).begin() as c:
                    for statement in in_row_ddl(element):
                        c.execute(text(statement))
                    # The merge function's own time, in pg_stat_user_functions.
                    name = c.execute(text("SELECT current_database()")).scalar()
                    c.execute(text(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'"))
        for _ in range(arguments.repeat):
            for variant, url in urls.items():
                runs[variant].append(
                    apply_all(url, texts, arguments.batch_events, VARIANTS[variant])
                )
                print(variant, json.dumps(runs[variant][-1]), flush=True)
        result: dict[str, Any] = {
            **summary("bench.histogram_in_row", arguments, runs),
            "sizes_bytes": {variant: table_sizes(url) for variant, url in urls.items()},
        }
        in_row = {v: VARIANTS[v] is not None for v in VARIANTS}
        histograms = {v: _read(url, HISTOGRAMS[in_row[v]])[0] for v, url in urls.items()}
        result["histogram_buckets"] = len(histograms["rows"])
        result["histograms_equal_to_rows"] = {
            v: histograms[v] == histograms["rows"] for v in VARIANTS if in_row[v]
        }
        overview = {v: _read(url, OVERVIEW[in_row[v]]) for v, url in urls.items()}
        result["overview_histogram_equal_to_rows"] = {
            v: overview[v][0] == overview["rows"][0] for v in VARIANTS if in_row[v]
        }
        result["overview_histogram_ms"] = {v: seconds * 1e3 for v, (_, seconds) in overview.items()}
        result["merge_function"] = {
            v: merge_function_time(url) for v, url in urls.items() if in_row[v]
        }
        result["redelivery_changes_nothing"] = {
            v: redelivery_changes_nothing(url, texts[1], VARIANTS[v] or "")
            for v, url in urls.items()
            if in_row[v]
        }
        result["explain"] = {
            v: explained(url, VARIANTS[v], arguments.sessions, arguments.batch_events)
            for v, url in urls.items()
        }
    write_result("histogram-in-row", result)


if __name__ == "__main__":
    main()
