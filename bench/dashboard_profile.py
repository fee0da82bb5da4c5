"""Where the dashboard overview's time goes, store call by store call (not a test).

Seeds a store as ``bench.dashboard`` does (or reuses one seeded before, ``--url``), then
times each read the overview makes (``sessions.dashboard.views.overview``: ``activity``,
``unhealthy``, ``by_status``, ``top_users`` by requests and by p95, ``health_counts``),
median of ``--repeat`` calls, and explains every statement each call runs: on PostgreSQL
``EXPLAIN (ANALYZE, BUFFERS)`` (execution ms, shared buffers, the plan's nodes), on SQLite
the statement's own time and ``EXPLAIN QUERY PLAN``::

    python -m bench.dashboard_profile --backend postgresql --keep   # seeds, prints the URL
    python -m bench.dashboard_profile --url postgresql+psycopg://...  # reuses it
    python -m bench.dashboard_profile --url ... --calls unhealthy health_counts --no-explain

Prints JSON, and writes it to ``bench/results/dashboard-profile-<time>.json`` with ``--save``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from bench.dashboard import RESULTS, seed
from bench.overview_calls import call_seconds, overview_calls
from bench.sweeps import captured_statements
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import POSTGRES_ADMIN_URL


def _plan_nodes(plan: dict[str, Any], depth: int = 0) -> Iterator[str]:
    label = plan["Node Type"]
    for key in ("Relation Name", "Index Name", "Function Name"):
        if key in plan:
            label += f" {plan[key]}"
    label += f" (rows {plan.get('Actual Rows')}, {plan.get('Actual Total Time')} ms)"
    yield "  " * depth + label
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child, depth + 1)


def explain(store: SessionStore, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Each captured ``SELECT``: its first words, its time and (PostgreSQL) buffers and plan."""
    found = []
    with store.engine.connect() as connection:
        raw = connection.connection
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            head = " ".join(statement.split())[:90]
            cursor = raw.cursor()
            if store.engine.dialect.name == "postgresql":
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters)
                report = cursor.fetchone()[0][0]
                found.append(
                    {
                        "statement": head,
                        "execution_ms": report["Execution Time"],
                        "shared_hit_blocks": report["Plan"].get("Shared Hit Blocks", 0),
                        "shared_read_blocks": report["Plan"].get("Shared Read Blocks", 0),
                        "plan": list(_plan_nodes(report["Plan"])),
                    }
                )
                raw.rollback()
            else:
                cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
                plan = [row[3] for row in cursor.fetchall()]
                times = []
                for _ in range(3):
                    started = time.perf_counter()
                    cursor.execute(statement, parameters)
                    cursor.fetchall()
                    times.append(time.perf_counter() - started)
                found.append(
                    {
                        "statement": head,
                        "execution_ms": statistics.median(times) * 1000,
                        "plan": plan,
                    }
                )
    return found


def profile(
    store: SessionStore, repeat: int, only: list[str] | None = None, plans: bool = True
) -> dict[str, Any]:
    """Each of the overview's calls (``only`` those named) timed ``repeat`` times after a
    warm-up call, and (``plans``) its statements explained."""
    calls = overview_calls(store)
    result: dict[str, Any] = {}
    for name, call in calls.items():
        if only and name not in only:
            continue
        call()  # warm
        seconds = call_seconds(call, repeat)
        result[name] = {
            "median_ms": statistics.median(seconds) * 1000,
            "max_ms": max(seconds) * 1000,
        }
        if plans:
            with captured_statements(store.engine) as statements:
                call()
            result[name]["statements"] = explain(store, statements)
    return result


@contextmanager
def seeded(backend: str, sessions: int, keep: bool) -> Iterator[str]:
    """A store of ``sessions`` seeded sessions on ``backend``: its URL, for the block."""
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="dashboard-profile-")
        url = f"sqlite:///{folder}/dashboard.db"
    else:
        name = f"sessions_dashprof_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)
    store = SessionStore(url, settings=Settings(database_url=url))
    store.upgrade()
    events, seconds = seed(store, sessions)
    if backend == "postgresql":
        with store.engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")
    store.dispose()
    print(f"seeded {sessions:,} sessions ({events:,} events) in {seconds:.0f}s: {url}")
    try:
        yield url
    finally:
        if not keep and backend == "postgresql":
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        elif not keep:
            Path(folder, "dashboard.db").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--url", help="a store seeded before (skips seeding)")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the seeded store")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--calls", nargs="+", help="time only these calls (names as printed)")
    parser.add_argument("--no-explain", action="store_true", help="time the calls only")
    arguments = parser.parse_args()

    def run(url: str) -> dict[str, Any]:
        store = SessionStore(url, settings=Settings(database_url=url))
        try:
            found = profile(store, arguments.repeat, arguments.calls, not arguments.no_explain)
            return {"backend": store.engine.dialect.name, **found}
        finally:
            store.dispose()

    if arguments.url:
        result = run(arguments.url)
    else:
        with seeded(arguments.backend, arguments.sessions, arguments.keep) as url:
            result = run(url)
    print(json.dumps(result, indent=1))
    if arguments.save:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (RESULTS / f"dashboard-profile-{stamp}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
