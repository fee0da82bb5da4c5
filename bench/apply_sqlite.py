"""``store.apply()`` alone on SQLite, the embedded default: this tree against another (not a test).

The same wire-form batches (``bench.ingest.wire_batches``) are applied by ``SessionStore.apply``
to a fresh SQLite file in a child process per tree, the trees alternated in each round; SQLite
runs in the child, so the child's CPU is the whole cost. The first batch of each run is
untimed (connecting, migrating, compiling). Three small batches at the end take the other
paths (:func:`later_run_batches`): sessions ended and created again, then records older than
their new run (left alone by the fast path, for the slow one), at its very start, and for
sessions untouched. Afterwards every run's ``sessions`` and ``session_runs`` rows must be
equal to the first run's, column for column (the histograms as their buckets), else the
bench fails::

    mkdir -p /tmp/before && git archive a80aea9 | tar -x -C /tmp/before
    python -m bench.apply_sqlite --source /tmp/before        # 3 rounds, batches of 2000

Prints a table and writes ``bench/results/apply-sqlite-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.ingest import REPO_ROOT, wire_batches

#: What a child runs, with the tree under test first on ``sys.path``: argv is the batches'
#: file and the SQLite file. It prints its figures as JSON.
CHILD = """
import json, sys, time
import sessions
from sessions.database import upgrade_schema
from sessions.settings import Settings
from sessions.store import SessionStore

texts = json.loads(open(sys.argv[1]).read())
url = f"sqlite:///{sys.argv[2]}"
upgrade_schema(url)
store = SessionStore(url, settings=Settings())
store.apply(texts[0])
cpu, wall = time.process_time(), time.perf_counter()
for text in texts[1:]:
    store.apply(text)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
store.dispose()
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "sessions_file": sessions.__file__}))
"""

#: The columns compared between runs, by table.
COUNTERS = (
    "request_count, error_count, total_processing_time, input_tokens, output_tokens, cost, latency"
)
COLUMNS = {
    "sessions": "session_id, user_id, status, run, created_at, last_activity,"
    f" last_activity_minute, error_rate_bound, {COUNTERS}",
    "session_runs": f"session_id, run, status, created_at, last_activity, ended_at, {COUNTERS}",
}
#: Sessions :func:`later_run_batches` starts a second run of (of the first ones).
RESTARTED = 100


def later_run_batches(after: datetime) -> list[str]:
    """Wire-form batches past the fast path's usual case, with times from ``after`` on: the
    first :data:`RESTARTED` sessions ended and created again; then records of half of them
    before their new run (the fast path leaves them alone; the slow path adds them to run 1),
    of the other half at their new run's very start, and of as many sessions untouched."""

    def at(seconds: float) -> str:
        return (after + timedelta(seconds=seconds)).isoformat()

    def batch(events: list[dict[str, Any]]) -> str:
        return json.dumps({"batch_id": str(uuid.uuid4()), "events": events})

    restarted = [f"bench-{k}" for k in range(RESTARTED)]
    untouched = [f"bench-{k}" for k in range(RESTARTED, 2 * RESTARTED)]
    half = RESTARTED // 2
    record = {"kind": "record", "processing_time": 0.25}
    return [
        batch(
            [
                {"kind": "end", "session_id": s, "at": at(1), "status": "completed"}
                for s in restarted
            ]
        ),
        batch([{"kind": "create", "session_id": s, "at": at(2)} for s in restarted]),
        batch(
            [{**record, "session_id": s, "at": at(0.5)} for s in restarted[:half]]
            + [{**record, "session_id": s, "at": at(2)} for s in restarted[half:]]
            + [{**record, "session_id": s, "at": at(3)} for s in untouched]
        ),
    ]


def run_tree(tree: Path, batches: Path, database: Path) -> dict[str, Any]:
    """Apply the batches in ``batches`` to a new SQLite file at ``database`` with ``tree``'s
    store; the child's CPU and wall-clock seconds over every batch but the first. Raises
    ``subprocess.CalledProcessError`` if the child fails, ``RuntimeError`` if it imported
    another tree's ``sessions``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONS_")}
    environment["PYTHONPATH"] = str(tree)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(batches), str(database)],
        cwd=tree,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    figures = dict(json.loads(done.stdout.splitlines()[-1]))
    if not Path(figures["sessions_file"]).resolve().is_relative_to(tree):
        raise RuntimeError(f"the child imported {figures['sessions_file']}, not {tree}'s")
    return figures


def rows_of(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The ``sessions`` and ``session_runs`` rows of ``database``, ordered, each histogram as
    its buckets."""
    import sqlite3

    found: dict[str, list[tuple[Any, ...]]] = {}
    with sqlite3.connect(database) as connection:
        for table, columns in COLUMNS.items():
            rows = connection.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()
            found[table] = [(*row[:-1], json.loads(row[-1]) if row[-1] else None) for row in rows]
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the tree to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--batches", type=int, default=21, help="the first one untimed")
    parser.add_argument("--batch-events", type=int, default=2_000)
    parser.add_argument("--no-save", action="store_true")
    arguments = parser.parse_args(argv)
    trees = {"before": arguments.source.resolve(), "now": REPO_ROOT}
    runs: list[dict[str, Any]] = []
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="apply-sqlite-") as folder:
        workdir = Path(folder)
        batches = workdir / "batches.json"
        texts = wire_batches(arguments.sessions, arguments.batches, arguments.batch_events)
        texts += later_run_batches(datetime.now(UTC))
        batches.write_text(json.dumps(texts))
        events = sum(len(json.loads(text)["events"]) for text in texts[1:])
        reference: dict[str, list[tuple[Any, ...]]] | None = None
        for round_ in range(arguments.rounds):
            # Alternated, and the order flipped every round: neither tree always runs first.
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for name in order:
                database = workdir / f"{name}-{round_}.db"
                figures = run_tree(trees[name], batches, database)
                rows = rows_of(database)
                if reference is None:
                    reference = rows
                elif rows != reference:
                    raise SystemExit(f"{name}, round {round_}: the sessions or their runs differ")
                runs.append(
                    {
                        "tree": name,
                        "round": round_,
                        "cpu_us_per_event": figures["cpu_s"] / events * 1e6,
                        "events_per_second": events / figures["wall_s"],
                    }
                )
                print(
                    f"{name}: {runs[-1]['cpu_us_per_event']:.1f} us of CPU per event, "
                    f"{runs[-1]['events_per_second']:,.0f} events/s",
                    file=sys.stderr,
                )
    summary = {
        name: {
            key: statistics.median(r[key] for r in runs if r["tree"] == name)
            for key in ("cpu_us_per_event", "events_per_second")
        }
        for name in trees
    }
    ratio = summary["now"]["cpu_us_per_event"] / summary["before"]["cpu_us_per_event"]
    print("| tree | CPU us per event (median) | events/s (median) |\n|---|---:|---:|")
    for name, figures in summary.items():
        cpu, rate = figures["cpu_us_per_event"], figures["events_per_second"]
        print(f"| {name} | {cpu:.1f} | {rate:,.0f} |")
    print(f"now / before, CPU per event: {ratio:.2f}; sessions and runs equal in every run")
    if not arguments.no_save:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = REPO_ROOT / "bench" / "results" / f"apply-sqlite-{stamp}.json"
        command = " ".join(["python", "-m", "bench.apply_sqlite", *(argv or sys.argv[1:])])
        path.write_text(
            json.dumps(
                {
                    "command": command,
                    "source": str(trees["before"]),
                    "load_average_at_start": load_at_start,
                    "load_average": os.getloadavg(),
                    "sessions": arguments.sessions,
                    "batch_events": arguments.batch_events,
                    "events_timed": events,
                    "summary": summary,
                    "now_over_before_cpu": ratio,
                    "runs": runs,
                },
                indent=1,
            )
        )
        print(f"saved {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
