"""SQLite: the overview's two histogram merges in SQL (``json_each``) against the same merges
folded in Python (``sessions.latency_fold``), on one kept store (not a test).

The two forms of each read, alternated ``--rounds`` times, each timed as the median of
``--repeat`` runs, and their answers compared (they must be equal):

* buckets by status: ``by_status``'s ``json_each`` statement grouped by status and bucket,
  against ``latency_texts(status)`` folded;
* the ranking of users by p95: ``queries.rank_users("p95", 10, [])``, against
  ``latency_texts(user_id)`` folded and ranked by ``rank_by_percentile``.

::

    python -m bench.sqlite_fold_probe --url sqlite:////tmp/dashboard-profile-.../dashboard.db

Prints JSON, and writes it to ``bench/results/sqlite-fold-probe-<time>.json`` with ``--save``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, create_engine, func, select

from bench.dashboard import RESULTS
from sessions import latency_fold, queries
from sessions.queries import BUCKET, COUNT, LIVE_LATENCY
from sessions.store import _ranked_by_p95_in_python
from sessions.tables import sessions_table


def buckets_sql(connection: Connection) -> dict[str, dict[int, int]]:
    """``by_status``'s statement as it is: ``(status, bucket, count)`` grouped in SQL."""
    t = sessions_table.c
    query = (
        select(t.status, BUCKET, func.sum(COUNT))
        .select_from(LIVE_LATENCY)
        .group_by(t.status, BUCKET)
    )
    found: dict[str, dict[int, int]] = {}
    for status, bucket, count in connection.execute(query):
        found.setdefault(status, {})[int(bucket)] = int(count)
    return found


def buckets_fold(connection: Connection) -> dict[str, dict[int, int]]:
    """The same histograms, the texts folded in Python."""
    rows = connection.execute(latency_fold.latency_texts(sessions_table.c.status, []))
    return latency_fold.fold(rows)


def ranking_sql(connection: Connection) -> list[str]:
    """``top_users(by="p95")``'s ranking statement."""
    return list(connection.execute(queries.rank_users("p95", 10, [])).scalars())


def ranking_fold(connection: Connection) -> list[str]:
    """The same ranking, the users' histograms folded and ranked in Python (the store's own
    function for it)."""
    users, _ = _ranked_by_p95_in_python(connection, 10, [])
    return users


def median_ms(connection: Connection, read: Callable[[Connection], Any], repeat: int) -> float:
    """The median wall-clock ms of ``repeat`` runs of ``read``."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        read(connection)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a kept SQLite store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--save", action="store_true")
    arguments = parser.parse_args()
    engine = create_engine(arguments.url)
    pairs = {
        "buckets by status": (buckets_sql, buckets_fold),
        "p95 ranking": (ranking_sql, ranking_fold),
    }
    result: dict[str, Any] = {
        "url": arguments.url,
        "repeat": arguments.repeat,
        "load": os.getloadavg(),
    }
    with engine.connect() as connection:
        for name, (sql, folded) in pairs.items():
            same = sql(connection) == folded(connection)  # also the warm-up
            rounds = [
                {
                    form: median_ms(connection, read, arguments.repeat)
                    for form, read in (("sql_ms", sql), ("fold_ms", folded))
                }
                for _ in range(arguments.rounds)
            ]
            sql_ms = statistics.median(r["sql_ms"] for r in rounds)
            fold_ms = statistics.median(r["fold_ms"] for r in rounds)
            result[name] = {
                "same": same,
                "rounds": rounds,
                "sql_ms": sql_ms,
                "fold_ms": fold_ms,
                "speedup": sql_ms / fold_ms,
            }
            print(name, json.dumps(result[name]), flush=True)
    engine.dispose()
    print(json.dumps(result, indent=1))
    if arguments.save:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (RESULTS / f"sqlite-fold-probe-{stamp}.json").write_text(json.dumps(result, indent=1))
    differ = [name for name in pairs if not result[name]["same"]]
    if differ:
        raise SystemExit(f"the two forms' answers differ: {', '.join(differ)}")


if __name__ == "__main__":
    main()
