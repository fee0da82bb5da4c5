"""The dashboard's page load time on a large store (not a test: timings are never asserted).

Seeds N sessions (default 100,000) over N/100 users through ``store.apply`` in batches of
5,000 events, so every table the pages read (counters, latency histograms, per-minute
activity) is filled the way workers fill it: about 4.5 requests per session spread over the
last two hours, 4% errors (a few sessions failing hard), costs, and 40% completed, 5%
failed, 15% expired. Then serves the dashboard with uvicorn on 127.0.0.1 and times whole
HTTP GETs of each page (server time plus transfer, as a browser on the same host sees it;
the pages load nothing else), on SQLite and on PostgreSQL::

    python -m bench.dashboard                       # 100,000 sessions, 9 requests per page
    python -m bench.dashboard --sessions 10000 --repeat 3 --backend sqlite
    python -m bench.dashboard --url sqlite:////tmp/x/dashboard.db   # a store seeded before

``--url`` (repeatable) times the pages of stores seeded before (``python -m
bench.dashboard_profile --keep`` leaves one) instead of seeding new ones.

Prints a markdown table and writes ``bench/results/dashboard-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import uvicorn

from sessions.dashboard.app import create_app
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import temporary_postgres_database

RESULTS = Path(__file__).resolve().parent / "results"
#: Events per ``store.apply`` while seeding.
BATCH_EVENTS = 5_000
#: Seconds to wait for the server to start answering.
START_DEADLINE = 30.0


@dataclass
class PageTiming:
    page: str
    path: str
    seconds: list[float] = field(default_factory=list)
    bytes: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def max_ms(self) -> float:
        return max(self.seconds) * 1000


def seed_events(sessions: int, now: datetime, rng: random.Random) -> Iterator[dict[str, Any]]:
    """The wire form of every event of ``sessions`` sessions, session by session."""
    users = max(sessions // 100, 1)
    for n in range(sessions):
        session_id = f"session-{n}"
        # Skewed: low user numbers have many more sessions, so "top users" means something.
        user_id = f"user-{int(users * rng.random() ** 2)}"
        started = now - timedelta(minutes=rng.uniform(1, 120))
        failing = rng.random() < 0.02
        moment = started
        requests = rng.randint(1, 8)
        for _ in range(requests):
            moment = min(moment + timedelta(seconds=rng.uniform(0.5, 30)), now)
            tokens_in, tokens_out = rng.randint(50, 2000), rng.randint(20, 800)
            yield {
                "kind": "record",
                "session_id": session_id,
                "user_id": user_id,
                "at": moment.isoformat(),
                "processing_time": round(rng.lognormvariate(-1.5, 0.8), 4),
                "error": rng.random() < (0.6 if failing else 0.03),
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "cost": round((tokens_in * 3 + tokens_out * 15) / 1_000_000, 6),
            }
        fate = rng.random()
        if fate < 0.60:
            status = "completed" if fate < 0.40 else "failed" if fate < 0.45 else "expired"
            yield {
                "kind": "end",
                "session_id": session_id,
                "at": min(moment + timedelta(seconds=1), now).isoformat(),
                "status": status,
            }


def seed(store: SessionStore, sessions: int) -> tuple[int, float]:
    """Apply the seed in batches; how many events, and how long it took."""
    rng = random.Random(7)
    now = datetime.now(UTC) - timedelta(seconds=5)
    started = time.perf_counter()
    pending: list[dict[str, Any]] = []
    total = 0
    for event in seed_events(sessions, now, rng):
        pending.append(event)
        if len(pending) >= BATCH_EVENTS:
            total += store.apply({"batch_id": str(uuid.uuid4()), "events": pending}).applied
            pending = []
    if pending:
        total += store.apply({"batch_id": str(uuid.uuid4()), "events": pending}).applied
    return total, time.perf_counter() - started


@contextmanager
def served(settings: Settings) -> Iterator[str]:
    """The dashboard served by uvicorn on a free loopback port, for the block."""
    from tests.support.workers_harness import free_port  # a checkout's, as bench.ingest's

    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_DEADLINE
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_DEADLINE)
        app.state.store.dispose()


def time_pages(base: str, pages: list[tuple[str, str]], repeat: int) -> list[PageTiming]:
    timings = [PageTiming(name, path) for name, path in pages]
    with httpx.Client(base_url=base, timeout=60) as client:
        for timing in timings:
            client.get(timing.path).raise_for_status()  # warm: pool, statement caches
        for _ in range(repeat):  # interleaved, so a burst of load hits every page alike
            for timing in timings:
                started = time.perf_counter()
                response = client.get(timing.path)
                timing.seconds.append(time.perf_counter() - started)
                response.raise_for_status()
                timing.bytes = len(response.content)
    return timings


def bench_backend(url: str, sessions: int | None, repeat: int) -> dict[str, Any]:
    """Seed ``sessions`` sessions into the store at ``url`` (``None``: it is seeded already)
    and time its pages."""
    settings = Settings(database_url=url)
    store = SessionStore(url, settings=settings)
    store.upgrade()
    events, seconds = 0, 0.0
    if sessions is None:
        with store.engine.connect() as connection:
            counted = connection.exec_driver_sql("SELECT count(*) FROM sessions").scalar()
        sessions = int(counted or 0)
    else:
        events, seconds = seed(store, sessions)
        if store.engine.dialect.name == "postgresql":
            with store.engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")
    print(
        f"{store.engine.dialect.name}: {sessions:,} sessions (seeded {events:,} events "
        f"in {seconds:.1f}s)"
    )
    top_user = "user-0"
    busiest = store.list_sessions(user_id=top_user, limit=1)[0].session_id
    pages = [
        ("overview `/`", "/"),
        ("overview, top users by p95", "/?by=p95"),
        ("a user's sessions `/sessions?user=`", f"/sessions?user={top_user}"),
        ("session detail `/session?id=`", f"/session?id={busiest}"),
    ]
    store.dispose()
    with served(settings) as base:
        timings = time_pages(base, pages, repeat)
    return {
        "backend": store.engine.dialect.name,
        "sessions": sessions,
        "events": events,
        "seed_seconds": seconds,
        "pages": [
            {"page": t.page, "path": t.path, "seconds": t.seconds, "bytes": t.bytes}
            for t in timings
        ],
        "timings": timings,
    }


def report(results: list[dict[str, Any]], repeat: int) -> str:
    lines = [
        f"Dashboard page load on {results[0]['sessions']:,} sessions, median of {repeat} GETs "
        f"({platform.machine()}, Python {platform.python_version()})",
        "",
        "| page | backend | median ms | max ms | KiB |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        for t in result["timings"]:
            lines.append(
                f"| {t.page} | {result['backend']} | {t.median_ms:.0f} | {t.max_ms:.0f} "
                f"| {t.bytes / 1024:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--url", action="append", default=[], help="a store seeded before")
    arguments = parser.parse_args()
    results = [bench_backend(url, None, arguments.repeat) for url in arguments.url]
    if not arguments.url and arguments.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/dashboard.db"
            results.append(bench_backend(url, arguments.sessions, arguments.repeat))
    if not arguments.url and arguments.backend in ("postgresql", "both"):
        with temporary_postgres_database("sessions_bench") as url:
            results.append(bench_backend(url, arguments.sessions, arguments.repeat))
    print(report(results, arguments.repeat))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for result in results:
        del result["timings"]
    (RESULTS / f"dashboard-{stamp}.json").write_text(
        json.dumps({"repeat": arguments.repeat, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
