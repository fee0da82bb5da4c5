"""What merging a live row's latency histogram costs PostgreSQL (not a test).

The fast path's upsert merges each batch's histogram delta into the row's ``latency``
(``session_latency_add``, revision 0008: PL/pgSQL, looping over the delta's pairs). Two
measurements on a fresh PostgreSQL database migrated to head, both alternated in one run:

* **calls**: one ``SELECT`` of an expression over every row of a table of ``--rows`` rows
  (``h`` a histogram of 15 or 50 buckets, ``d`` a delta of 2, as the shipped functions
  store them), per call: ``h || d`` (the cheapest array write), a PL/pgSQL function that only
  returns ``h`` (what calling PL/pgSQL with the array costs), the same looking both of the
  delta's buckets up with ``array_position``, and ``session_latency_add`` itself;
* **apply**: ``store.apply()`` of the same batches (``bench.ingest.wire_batches``, 2000
  events over 1,000 sessions) with the upsert as it is and with its merge replaced by two
  cost probes (the histograms are then wrong): ``latency = s.latency`` (the array left as it
  is) and the array rotated by one pair (a new value at every update, as a merge writes, made
  by builtins); PostgreSQL's CPU per event of each, and the fraction of HOT updates. Every
  timed run starts from the same rows: the tables emptied, then ``--events`` events applied
  with the shipped merge (untimed), so that each row's histogram has the width a merge gives
  it (a probe alone would keep the few buckets of the row's first batch: rows of about 190
  bytes instead of 860, and a 2-element array, which rotating leaves as it is), then as many
  events again, new batches, timed, with the upsert under test.

::

    python -m bench.latency_merge                  # 100,000 rows, 3 rounds
    python -m bench.latency_merge --rounds 5 --events 400000

Prints a table and writes ``bench/results/latency-merge-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

import sessions.apply
from bench.apply_alone import hot_update_fraction
from bench.client_start import source_revision
from bench.ingest import TRUNCATE_OURS, _cpu_seconds, wire_batches
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import temporary_postgres_database

RESULTS = Path(__file__).resolve().parent / "results"

#: Helpers of the calls measurement: PL/pgSQL that returns its argument, and the same with
#: the merge's look-ups of the delta's buckets (the merge without its writes).
PROBES = """
CREATE FUNCTION probe_return(h bigint[], d bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$ BEGIN RETURN h; END $$;
CREATE FUNCTION probe_look_up(h bigint[], d bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE k int; i int;
BEGIN
    IF h IS NULL OR d IS NULL THEN RETURN h; END IF;
    FOR k IN 1 .. cardinality(d) BY 2 LOOP i := array_position(h, d[k]); END LOOP;
    RETURN h;
END $$;
"""
#: ``rows`` histograms of ``buckets`` pairs ``{-(b + 1), count}`` and a delta of two pairs,
#: one bucket already in the histogram and one not.
TABLE = """
CREATE TABLE merge_bench AS
SELECT ARRAY(SELECT x FROM generate_series(1, :buckets) AS b,
             LATERAL (VALUES (-(b * 3 + n % 7) - 1), (b)) AS v(x))::bigint[] AS h,
       ARRAY[-(3 + n % 7) - 1, 1, -(1000 + n % 5) - 1, 1]::bigint[] AS d
  FROM generate_series(1, :rows) AS n
"""
EXPRESSIONS = {
    "h || d": "h || d",
    "PL/pgSQL returning h": "probe_return(h, d)",
    "PL/pgSQL looking d's buckets up": "probe_look_up(h, d)",
    "session_latency_add(h, d)": "session_latency_add(h, d)",
}
#: The upsert's merge, and what the probes put in its place: the row's array left as it is,
#: and rotated by one pair (the same size, a new value at every update, as a merge writes,
#: made by builtins: what writing the changed array costs without PL/pgSQL's work).
MERGE = "latency = session_latency_add(s.latency, excluded.latency),"
PROBES_OF_THE_MERGE = {
    "not merged (probe: left as it is)": "latency = s.latency,",
    "rotated (probe: same size, changed)": "latency = s.latency[3:] || s.latency[1:2],",
}


def call_costs(url: str, rows: int, rounds: int) -> dict[str, dict[str, float]]:
    """Microseconds per call of each expression (median of ``rounds``), per histogram size."""
    engine = create_engine(url)
    found: dict[str, dict[str, float]] = {}
    with engine.connect() as c:
        c.execute(text(PROBES))
        for buckets in (15, 50):
            c.execute(text("DROP TABLE IF EXISTS merge_bench"))
            c.execute(text(TABLE), {"buckets": buckets, "rows": rows})
            c.execute(text("ANALYZE merge_bench"))
            timings: dict[str, list[float]] = {name: [] for name in EXPRESSIONS}
            for _ in range(rounds):
                for name, expression in EXPRESSIONS.items():  # alternated within each round
                    started = time.perf_counter()
                    c.execute(text(f"SELECT sum(cardinality({expression})) FROM merge_bench"))
                    timings[name].append(time.perf_counter() - started)
            found[f"{buckets} buckets"] = {
                name: statistics.median(seconds) / rows * 1e6 for name, seconds in timings.items()
            }
        c.commit()
    engine.dispose()
    return found


def apply_costs(url: str, events: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    """:func:`timed_apply` with the upsert as shipped and with each probe's, alternated
    ``rounds`` times, each from rows seeded by ``events`` events applied as shipped."""
    shipped = sessions.apply._PG_UPSERT
    assert MERGE in shipped.text, "the upsert's merge is spelled as this bench expects"
    statements = {"merged (shipped)": shipped} | {
        name: text(shipped.text.replace(MERGE, probe))
        for name, probe in PROBES_OF_THE_MERGE.items()
    }
    batches = max(20, events // 2000)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in statements}
    try:
        for _ in range(rounds):
            for name, statement in statements.items():
                # New batch ids every run: the ledger would drop a batch it has applied.
                seed, timed = (wire_batches(1_000, batches, 2000) for _ in range(2))
                runs[name].append(timed_apply(url, seed, timed, shipped, statement))
    finally:
        sessions.apply._PG_UPSERT = shipped
    return runs


def timed_apply(
    url: str, seed: list[str], timed: list[str], shipped: Any, under_test: Any
) -> dict[str, float]:
    """Empty the tables, apply ``seed`` with the ``shipped`` upsert, then ``timed`` with
    ``under_test``: PostgreSQL's CPU per event of the timed part (its backend's, from
    ``/proc``), and the fraction of its updates of ``sessions`` that were HOT."""
    store = SessionStore(url, settings=Settings())
    with store.engine.begin() as c:
        c.execute(text(TRUNCATE_OURS))
    sessions.apply._PG_UPSERT = shipped
    for message in seed:
        store.apply(message)
    with store.engine.begin() as c:
        c.execute(text("SELECT pg_stat_reset_single_table_counters('sessions'::regclass)"))
    sessions.apply._PG_UPSERT = under_test
    store.apply(timed[0])  # prepares the statement under test
    with store.engine.connect() as c:  # the pool's one connection: the one apply uses
        backend = int(c.execute(text("SELECT pg_backend_pid()")).scalar_one())
    before = _cpu_seconds(backend)
    for message in timed[1:]:
        store.apply(message)
    server = _cpu_seconds(backend) - before
    store.dispose()  # its backend exits, and reports its statistics
    return {
        "postgresql_us_per_event": server / ((len(timed) - 1) * 2000) * 1e6,
        "sessions_hot_update_fraction": hot_update_fraction(url),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the calls' table")
    parser.add_argument(
        "--events", type=int, default=200_000, help="events seeded, then timed, per apply run"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    arguments = parser.parse_args()
    load = os.getloadavg()
    with temporary_postgres_database("sessions_bench_merge") as url:
        store = SessionStore(url, settings=Settings())
        store.upgrade()
        with store.engine.connect() as c:
            server_version = c.execute(text("SHOW server_version")).scalar_one()
        store.dispose()
        calls = call_costs(url, arguments.rows, arguments.rounds)
        applied = apply_costs(url, arguments.events, arguments.rounds)
    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "load_at_start": load,
        "load_at_end": os.getloadavg(),
        "revision": source_revision(),
        "postgresql": server_version,
        "arguments": vars(arguments),
        "us_per_call": calls,
        "apply": applied,
    }
    print("| expression | " + " | ".join(f"us per call, {size}" for size in calls) + " |")
    print("|---|" + "---:|" * len(calls))
    for name in EXPRESSIONS:
        print(f"| `{name}` | " + " | ".join(f"{calls[s][name]:.2f}" for s in calls) + " |")
    print()
    print("| upsert | PostgreSQL CPU us per event, each round | HOT updates |")
    print("|---|---:|---:|")
    for name, runs in applied.items():
        cpu = ", ".join(f"{run['postgresql_us_per_event']:.2f}" for run in runs)
        hot = statistics.median(run["sessions_hot_update_fraction"] for run in runs)
        print(f"| {name} | {cpu} | {hot:.3f} |")
    if not arguments.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"latency-merge-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
