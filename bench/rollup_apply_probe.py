"""What per-status and per-user rollups would cost the fast path on PostgreSQL (a probe, not
the store's code: the store has no rollups).

``store.apply()`` alone, as ``bench.apply_alone`` runs it (one process, one connection, ready
batches, 1,000 sessions, here of 100 users), with the fast path as it is and with a variant
whose one statement also adds each batch's deltas to two rollup tables: the sessions upsert
becomes a data-modifying CTE ``RETURNING`` each written row's user and status, joined back
to the batch's deltas, grouped by status and by user (the histogram deltas unfolded,
summed and folded again), and upserted into ``(status, shard)`` and ``(user_id, shard)``
rows, ``shard`` being ``pg_backend_pid() % 4`` (striped, so that concurrent workers do not
queue on one hot row). The two alternate ``--repeat`` times in one invocation::

    python -m bench.rollup_apply_probe --batch-events 2000 --repeat 3

Prints JSON: events/s and PostgreSQL CPU us per event of each run, and the medians' ratio.
Only the fast path is covered (the slow path, sweeps and purge would move whole sessions
between rollup rows): it is where the per-event cost is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

import sessions.apply as apply_module
from bench.ingest import apply_texts, plan
from sessions.records import COUNTERS
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import temporary_postgres_database

USERS = 100
SHARDS = 4
ROLLUPS = {"session_status_rollup": "status", "session_user_rollup": "user_id"}


def wire_batches(sessions: int, batches: int, batch_size: int) -> list[str]:
    """``bench.ingest.wire_batches``, each session belonging to one of :data:`USERS` users."""
    from sessions.events import RecordEvent
    from sessions.plain import batch_json, plain_record

    ids, times, errors = plan(0, batches * batch_size, sessions)
    texts: list[str] = []
    for b in range(batches):
        fields = []
        for j in range(b * batch_size, (b + 1) * batch_size):
            user = f"user-{zlib.crc32(ids[j].encode()) % USERS}"
            args = (ids[j], times[j], errors[j], user, True, 0, 0, 0.0)
            record = plain_record(*args)
            if record is None:
                RecordEvent(session_id=ids[j], user_id=user, at=datetime.now(UTC))
                record = plain_record(*args)
            assert record is not None
            fields.append(record)
        texts.append(batch_json(uuid.uuid4(), fields))
    return texts


def create_rollups(url: str) -> None:
    counters = ", ".join(
        f"{name} {'double precision' if name in ('cost', 'total_processing_time') else 'bigint'}"
        " NOT NULL DEFAULT 0"
        for name in COUNTERS
    )
    store = SessionStore(url, settings=Settings())
    with store.engine.begin() as c:
        for table, key in ROLLUPS.items():
            c.execute(
                text(
                    f"CREATE TABLE {table} ({key} varchar(255) NOT NULL, shard smallint NOT NULL,"
                    f" sessions bigint NOT NULL DEFAULT 0, {counters}, latency bigint[],"
                    f" PRIMARY KEY ({key}, shard)) WITH (fillfactor = 70)"
                )
            )
    store.dispose()


def rollup_upsert() -> str:
    """The fast path's statement with the rollups' upserts as data-modifying CTEs."""
    original = apply_module._PG_UPSERT.text
    start, conflict = original.index("FROM unnest("), original.index("ON CONFLICT")
    unnest = original[start + len("FROM ") : conflict]
    insert = original[:start] + "FROM d\n    " + original[conflict:]
    sums = ", ".join(f"sum(coalesce({name}, 0)) AS {name}" for name in COUNTERS)
    adds = ", ".join(f"{name} = r.{name} + excluded.{name}" for name in COUNTERS)
    ctes = []
    for n, (table, key) in enumerate(ROLLUPS.items()):
        where = "WHERE j.user_id IS NOT NULL" if key == "user_id" else ""
        ctes.append(
            f"""
        h{n} AS (SELECT j.{key}, b.key AS bucket, sum(b.value) AS n
                   FROM j, session_latency_buckets(CAST(j.latency AS bigint[])) AS b {where}
                  GROUP BY 1, 2),
        f{n} AS (SELECT h.{key}, array_agg(u.x ORDER BY h.bucket, u.o) AS latency
                   FROM h{n} h, unnest(ARRAY[-(h.bucket + 1), h.n]) WITH ORDINALITY AS u(x, o)
                  GROUP BY 1),
        r{n} AS (INSERT INTO {table} AS r ({key}, shard, sessions, {", ".join(COUNTERS)}, latency)
                 SELECT c.{key}, pg_backend_pid() % {SHARDS}, c.sessions,
                        {", ".join("c." + name for name in COUNTERS)}, f.latency
                   FROM (SELECT j.{key}, count(*) FILTER (WHERE j.inserted) AS sessions, {sums}
                           FROM j {where} GROUP BY 1) AS c
                   LEFT JOIN f{n} f ON f.{key} = c.{key}
                  ORDER BY c.{key}
                 ON CONFLICT ({key}, shard) DO UPDATE SET sessions = r.sessions + excluded.sessions,
                    {adds}, latency = session_latency_add(r.latency, excluded.latency))"""
        )
    return (
        f"WITH d AS (SELECT * FROM {unnest}),\n"
        f"    up AS ({insert}\n"
        "    RETURNING s.session_id, s.user_id, s.status, (s.xmax::text = '0') AS inserted),\n"
        "    j AS (SELECT up.user_id, up.status, up.inserted, "
        + ", ".join(f"d.{name}" for name in (*COUNTERS, "latency"))
        + " FROM up JOIN d USING (session_id)),"
        + ",".join(ctes)
        + "\nSELECT count(*) FROM up"
    )


@contextmanager
def with_rollups() -> Iterator[None]:
    statement = text(rollup_upsert())
    original = apply_module._upsert_records_postgresql

    def upsert(connection: Any, deltas: dict[str, Any]) -> set[str]:
        saved = apply_module._PG_UPSERT

        class Counted:  # the CTE answers one row, the count: what the store reads as rowcount
            def __init__(self, count: int) -> None:
                self.rowcount = count

        def execute(statement_: Any, parameters: Any) -> Any:
            if statement_ is saved:
                return Counted(int(connection_execute(statement, parameters).scalar_one()))
            return connection_execute(statement_, parameters)

        connection_execute = connection.execute
        connection.execute = execute
        try:
            return original(connection, deltas)
        finally:
            del connection.execute

    apply_module._upsert_records_postgresql = upsert
    try:
        yield
    finally:
        apply_module._upsert_records_postgresql = original


def check(url: str) -> dict[str, bool]:
    """The rollups hold what the sessions sum to (per status and per user)."""
    store = SessionStore(url, settings=Settings())
    found = {}
    with store.engine.connect() as c:
        for table, key in ROLLUPS.items():
            rolled = c.execute(
                text(f"SELECT {key}, sum(sessions), sum(request_count) FROM {table} GROUP BY 1")
            ).all()
            scanned = c.execute(
                text(
                    f"SELECT {key}, count(*), sum(request_count) FROM sessions"
                    f" WHERE {key} IS NOT NULL GROUP BY 1"
                )
            ).all()
            unfold = "session_latency_buckets(r.latency) b"
            buckets = c.execute(
                text(
                    f"SELECT {key}, b.key, sum(b.value) FROM {table} r, LATERAL {unfold}"
                    f" GROUP BY 1, 2"
                    f" EXCEPT SELECT {key}, b.key, sum(b.value) FROM sessions s,"
                    f" session_latency_buckets(s.latency) b GROUP BY 1, 2"
                )
            ).all()
            found[table] = sorted(rolled) == sorted(scanned) and not buckets
    store.dispose()
    return found


def explain_one_batch(url: str, text_: str, rollups: bool) -> list[dict[str, Any]]:
    """The fast path's (``rollups``: the rollup variant's) statements for one more batch
    under ``EXPLAIN (ANALYZE, BUFFERS)`` (rolled back): each statement's time and, for the
    CTE, each of its parts (``CTE d``, ``CTE up``, ``CTE r0``...: actual total time, from its
    first row to its last, so a part read lazily includes its reader's time)."""
    from bench.sweeps import captured_statements

    store = SessionStore(url, settings=Settings())
    variant = with_rollups() if rollups else nullcontext()
    with variant, captured_statements(store.engine) as statements:
        store.apply(text_)
    found = []
    with store.engine.connect() as connection:
        cursor = connection.connection.cursor()
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("WITH", "INSERT", "SELECT")):
                continue
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters)
            report = cursor.fetchone()[0][0]
            parts = {
                plan.get("Subplan Name", plan["Node Type"]): plan["Actual Total Time"]
                for plan in report["Plan"].get("Plans", [])
            }
            found.append(
                {
                    "statement": " ".join(statement.split())[:60],
                    "execution_ms": report["Execution Time"],
                    "shared_hit_blocks": report["Plan"].get("Shared Hit Blocks", 0),
                    "parts_ms": parts,
                }
            )
        connection.connection.rollback()
    store.dispose()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-events", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--explain", action="store_true", help="EXPLAIN one more batch")
    arguments = parser.parse_args()
    batches = max(20, arguments.events // arguments.batch_events)
    texts = wire_batches(arguments.sessions, batches, arguments.batch_events)
    runs: dict[str, list[dict[str, Any]]] = {"as is": [], "with rollups": []}
    with temporary_postgres_database("sessions_bench_rollup") as url:
        store = SessionStore(url, settings=Settings())
        store.upgrade()
        store.dispose()
        create_rollups(url)
        for _ in range(arguments.repeat):
            for label in runs:
                store = SessionStore(url, settings=Settings())
                with store.engine.begin() as c:
                    c.execute(text("TRUNCATE " + ", ".join(ROLLUPS)))
                store.dispose()
                if label == "as is":
                    result = apply_texts(url, texts, arguments.batch_events)
                else:
                    with with_rollups():
                        result = apply_texts(url, texts, arguments.batch_events)
                        result["rollups_exact"] = check(url)
                runs[label].append(result)
                print(label, json.dumps(result))
    medians = {
        label: {
            key: statistics.median([r[key] for r in found] or [0.0])
            for key in ("events_per_second", "postgresql_us_per_event", "client_us_per_event")
        }
        for label, found in runs.items()
    }
    ratio = {k: medians["with rollups"][k] / (medians["as is"][k] or 1.0) for k in medians["as is"]}
    summary: dict[str, Any] = {"runs": runs, "medians": medians, "with / as is": ratio}
    for rollups in (False, True) if arguments.explain else ():
        with temporary_postgres_database("sessions_bench_rollup") as url:
            store = SessionStore(url, settings=Settings())
            store.upgrade()
            store.dispose()
            create_rollups(url)
            with with_rollups() if rollups else nullcontext():
                apply_texts(url, texts[:-1], arguments.batch_events)
            label = "with rollups" if rollups else "as is"
            summary[f"explain {label}"] = explain_one_batch(url, texts[-1], rollups)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
