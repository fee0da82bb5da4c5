"""Sweep and read cost on a large PostgreSQL store (not a test: timings are never asserted).

Seeds N sessions (default 1,000,000) over 10,000 users in a fresh database, 10% idle past the
cutoff, 5% above the health fail rate, 2% past the maximum age, each with a latency
histogram of its 20 requests over 10 buckets, one archived run for 10% of them and a week of
per-minute activity; then times each sweep and read and shows, from ``EXPLAIN``, which index
each statement uses. Sweeps run as dry runs (the same statements in a transaction that is
rolled back), so every repetition sees the same data::

    python -m bench.sweeps                  # 1,000,000 sessions, 3 repetitions
    python -m bench.sweeps --sessions 100000 --repeat 5

Prints a markdown table and writes ``bench/results/sweeps-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text

from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import temporary_postgres_database

RESULTS = Path(__file__).resolve().parent / "results"
USERS = 10_000

SEED_SQL = """
INSERT INTO sessions (session_id, user_id, status, end_reason, run, created_at, last_activity,
                      last_activity_minute, ended_at, request_count, error_count,
                      total_processing_time, error_rate_bound)
SELECT session_id, user_id, status, end_reason, 1, created_at, last_activity,
       date_trunc('minute', last_activity, 'UTC'), ended_at, 20, error_count, 20 * 0.25,
       CASE WHEN error_count > 0 THEN LEAST(16 * error_count / 20 + 2, 18) ELSE 0 END
FROM (
    SELECT 'session-' || n AS session_id,
           'user-' || (n % :users) AS user_id,
           CASE WHEN n % 20 = 7 THEN 'completed' ELSE 'active' END AS status,
           CASE WHEN n % 20 = 7 THEN 'explicit' END AS end_reason,
           now() - CASE WHEN n % 50 = 11 THEN interval '8 days'
                        ELSE (n % 5000) * interval '1 minute' END AS created_at,
           now() - CASE WHEN n % 10 = 3 THEN interval '2 hours'
                        ELSE (n % 1500) * interval '1 second' END AS last_activity,
           CASE WHEN n % 20 = 7 THEN now() - interval '1 minute' END AS ended_at,
           CASE WHEN n % 20 = 9 THEN 15 ELSE n % 3 END AS error_count
    FROM generate_series(1, :sessions) AS n
) AS seed
"""
SEED_RUNS_SQL = """
INSERT INTO session_runs (session_id, user_id, status, end_reason, run, created_at,
                          last_activity, ended_at, request_count, error_count,
                          total_processing_time)
SELECT session_id, user_id, 'expired', 'idle', 1, created_at - interval '1 hour',
       created_at - interval '40 minutes', created_at - interval '10 minutes', 20, 0, 5
FROM sessions WHERE right(session_id, 1) = '7'
"""
SEED_LIVE_RUNS_SQL = "UPDATE sessions SET run = 2 WHERE right(session_id, 1) = '7'"
#: Every run's 20 requests over 10 buckets (2 each), from about 0.1 s up to about 10 s, in
#: the run row's ``latency`` pairs (revision 0008).
SEED_LATENCY_SQL = """
UPDATE {table} SET latency = ARRAY(
    SELECT u.n FROM generate_series(0, 9) AS b,
           unnest(ARRAY[-(141 + (hashtext(session_id) & 7) + 8 * b), 2]) WITH ORDINALITY AS u(n, o)
     ORDER BY b, u.o
)
"""
SEED_ACTIVITY_SQL = """
INSERT INTO activity_minutes (minute, events, requests, errors)
SELECT date_trunc('minute', now()) - m * interval '1 minute', 1000, 990, 99
FROM generate_series(0, 7 * 24 * 60 - 1) AS m
"""


@dataclass
class Measurement:
    name: str
    seconds: list[float] = field(default_factory=list)
    rows: int = 0
    plans: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def uses_index(self) -> bool:
        return bool(self.plans) and all("Index" in plan for plan in self.plans)


@contextmanager
def captured_statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the engine runs inside the block, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def explain(engine: Engine, statements: list[tuple[str, Any]]) -> list[str]:
    """The scan nodes PostgreSQL chooses for each captured statement."""
    plans = []
    with engine.connect() as connection:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
                continue
            cursor = connection.connection.cursor()
            cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
            plan = cursor.fetchone()[0][0]["Plan"]
            plans.append(" > ".join(_scan_nodes(plan)))
            connection.connection.rollback()
    return plans


def _scan_nodes(plan: dict[str, Any]) -> Iterator[str]:
    if "Scan" in plan["Node Type"]:
        yield f"{plan['Node Type']} {plan.get('Index Name', plan.get('Relation Name', ''))}".strip()
    for child in plan.get("Plans", []):
        yield from _scan_nodes(child)


def measure(
    store: SessionStore, name: str, operation: Callable[[], int], repeat: int
) -> Measurement:
    result = Measurement(name)
    for attempt in range(repeat):
        with captured_statements(store.engine) as statements:
            started = time.perf_counter()
            result.rows = operation()
            result.seconds.append(time.perf_counter() - started)
        if attempt == 0:
            result.plans = explain(store.engine, statements)
    return result


def run(sessions: int, repeat: int) -> list[Measurement]:
    with temporary_postgres_database("sessions_bench") as url:
        store = SessionStore(url, settings=Settings())
        store.upgrade()
        started = time.perf_counter()
        with store.engine.begin() as connection:
            connection.execute(text(SEED_SQL), {"users": USERS, "sessions": sessions})
            latency = [SEED_LATENCY_SQL.format(table=name) for name in ("sessions", "session_runs")]
            for statement in (SEED_RUNS_SQL, SEED_LIVE_RUNS_SQL, *latency):
                connection.execute(text(statement))
            connection.execute(text(SEED_ACTIVITY_SQL))
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
        print(f"seeded {sessions:,} sessions in {time.perf_counter() - started:.1f}s")
        user = "user-4242"
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        minute_ago = datetime.now(UTC) - timedelta(minutes=1)
        operations: list[tuple[str, Callable[[], int]]] = [
            ("expire_idle", lambda: store.expire_idle(1800, dry_run=True).count),
            ("expire_older_than", lambda: store.expire_older_than(dry_run=True).count),
            ("sweep_health (fail 0.5)", lambda: store.sweep_health(dry_run=True).count),
            ("aggregate(user_id)", lambda: store.aggregate(user_id=user).sessions),
            (
                "list_sessions(user_id) page of 100",
                lambda: len(store.list_sessions(user_id=user, limit=100)),
            ),
            ("count_active", store.count_active),
            ("get(session_id)", lambda: int(store.get("session-4242") is not None)),
            ("aggregate(), every session", lambda: store.aggregate().sessions),
            ("aggregate(since=1 hour ago)", lambda: store.aggregate(since=hour_ago).sessions),
            ("top_users('requests'), 10", lambda: len(store.top_users("requests"))),
            ("top_users('p95'), 10", lambda: len(store.top_users("p95"))),
            ("aggregate(since=1 minute ago)", lambda: store.aggregate(since=minute_ago).sessions),
            (
                "top_users('p95', since=1 minute ago), 10",
                lambda: len(store.top_users("p95", since=minute_ago)),
            ),
            ("activity(since=1 hour ago)", lambda: len(store.activity(hour_ago))),
        ]
        results = [measure(store, name, operation, repeat) for name, operation in operations]
        store.dispose()
        return results


def report(results: list[Measurement], sessions: int, repeat: int) -> str:
    lines = [
        f"Sweeps and reads on {sessions:,} sessions, PostgreSQL, median of {repeat} "
        f"({platform.machine()}, Python {platform.python_version()})",
        "",
        "| operation | rows | median ms | plan |",
        "|---|---:|---:|---|",
    ]
    for r in results:
        plan = "; ".join(r.plans) or "-"
        lines.append(f"| {r.name} | {r.rows:,} | {r.median_ms:.1f} | {plan} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    results = run(arguments.sessions, arguments.repeat)
    print(report(results, arguments.sessions, arguments.repeat))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"sweeps-{stamp}.json").write_text(
        json.dumps(
            {
                "sessions": arguments.sessions,
                "repeat": arguments.repeat,
                "results": [
                    {"name": r.name, "rows": r.rows, "seconds": r.seconds, "plans": r.plans}
                    for r in results
                ],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
