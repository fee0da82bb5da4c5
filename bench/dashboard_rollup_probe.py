"""What the overview's rollup-shaped reads would cost (not a test, not the store's code).

On a store seeded by ``bench.dashboard_profile --keep``, builds per-status and per-user
rollups as temporary tables (counters and the merged histogram per ``(status, shard)`` and
``(user_id, shard)``, sessions spread over ``--shards`` stripes by a hash of their id, as
concurrent writers would spread them), then times the reads a rollup-backed overview would
make, median of ``--repeat``, and checks their numbers against the store's scans::

    python -m bench.dashboard_rollup_probe --url sqlite:////tmp/.../dashboard.db --shards 4

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, text

from bench.overview_calls import call_seconds
from sessions.dashboard.reads import by_status
from sessions.histogram import percentile
from sessions.records import COUNTERS, percentile_fields
from sessions.settings import Settings
from sessions.store import SessionStore

SUMS = ", ".join(f"sum({name}) AS {name}" for name in COUNTERS)
COLUMNS = ", ".join(COUNTERS)


def build(connection: Connection, shards: int) -> None:
    pg = connection.dialect.name == "postgresql"
    # A stripe per session, as if written by ``shards`` processes in turn.
    shard = f"abs(hashtext(s.session_id)) % {shards}" if pg else f"s.rowid % {shards}"
    unfold = "session_latency_buckets(s.latency) b" if pg else "json_each(s.latency) b"
    for name, key in (("r_status", "status"), ("r_user", "user_id")):
        where = "WHERE user_id IS NOT NULL" if key == "user_id" else ""
        connection.execute(
            text(
                f"CREATE TEMP TABLE {name}_c AS SELECT {key}, {shard} AS shard, count(*) AS"
                f" sessions, {SUMS} FROM sessions s {where} GROUP BY 1, 2"
            )
        )
        connection.execute(
            text(
                f"CREATE TEMP TABLE {name}_h AS SELECT {key}, {shard} AS shard,"
                f" CAST(b.key AS INTEGER) AS bucket, CAST(sum(b.value) AS BIGINT) AS n"
                f" FROM sessions s, {unfold}"
                f" {where} GROUP BY 1, 2, 3"
            )
        )
        if pg:
            fold = (
                f"SELECT h.{key}, h.shard, array_agg(u.x ORDER BY h.bucket, u.o) AS latency"
                f" FROM {name}_h h, unnest(ARRAY[-(h.bucket + 1), h.n]) WITH ORDINALITY"
                f" AS u(x, o) GROUP BY 1, 2"
            )
        else:
            fold = (
                f"SELECT {key}, shard, json_group_object(CAST(bucket AS TEXT), n) AS latency"
                f" FROM {name}_h GROUP BY 1, 2"
            )
        connection.execute(
            text(
                f"CREATE TEMP TABLE {name} AS SELECT c.*, f.latency FROM {name}_c c LEFT JOIN"
                f" ({fold}) f ON f.{key} = c.{key} AND f.shard = c.shard"
            )
        )
        if key == "user_id":
            connection.execute(text(f"CREATE INDEX ix_{name} ON {name} (user_id)"))
        connection.execute(text(f"ANALYZE {name}"))


def reads(connection: Connection) -> dict[str, Callable[[], Any]]:
    pg = connection.dialect.name == "postgresql"
    unfold = "session_latency_buckets(r.latency) b" if pg else "json_each(r.latency) b"

    def status_breakdown() -> Any:
        totals = connection.execute(
            text(f"SELECT status, sum(sessions), {SUMS} FROM r_status GROUP BY status")
        ).all()
        buckets = connection.execute(
            text(
                f"SELECT r.status, CAST(b.key AS INTEGER), sum(b.value) FROM r_status r, {unfold}"
                " GROUP BY 1, 2"
            )
        ).all()
        histograms: dict[str, dict[int, int]] = {}
        for status, bucket, n in buckets:
            histograms.setdefault(status, {})[bucket] = int(n)
        return {row[0]: row[1:] for row in totals}, histograms

    def users_of(ids: list[str]) -> Any:
        marks = ", ".join(f"'{u}'" for u in ids)
        totals = connection.execute(
            text(
                f"SELECT user_id, sum(sessions), {SUMS} FROM r_user WHERE user_id IN"
                f" ({marks}) GROUP BY user_id"
            )
        ).all()
        buckets = connection.execute(
            text(
                f"SELECT r.user_id, CAST(b.key AS INTEGER), sum(b.value) FROM r_user r, {unfold}"
                f" WHERE r.user_id IN ({marks}) GROUP BY 1, 2"
            )
        ).all()
        return totals, buckets

    def top_requests() -> Any:
        ids = list(
            connection.execute(
                text(
                    "SELECT user_id FROM r_user GROUP BY user_id"
                    " ORDER BY sum(request_count) DESC, user_id LIMIT 10"
                )
            ).scalars()
        )
        users_of(ids)
        return ids

    def top_p95_sql() -> Any:
        ids = list(
            connection.execute(
                text(
                    "WITH m AS (SELECT r.user_id, CAST(b.key AS INTEGER) AS bucket,"
                    f" sum(b.value) AS n FROM r_user r, {unfold} GROUP BY 1, 2),"
                    " w AS (SELECT user_id, bucket, sum(n) OVER (PARTITION BY user_id ORDER BY"
                    " bucket) AS seen, sum(n) OVER (PARTITION BY user_id) AS total FROM m)"
                    " SELECT user_id FROM w WHERE seen >= CAST(0.95 AS DOUBLE PRECISION) * total"
                    " GROUP BY user_id ORDER BY min(bucket) DESC, user_id LIMIT 10"
                )
            ).scalars()
        )
        users_of(ids)
        return ids

    def top_p95_python() -> Any:
        merged: dict[str, dict[int, int]] = {}
        for user, latency in connection.execute(text("SELECT user_id, latency FROM r_user")):
            if latency is None:
                continue
            histogram = merged.setdefault(user, {})
            if isinstance(latency, str):
                pairs = ((int(k), v) for k, v in json.loads(latency).items())
            else:
                pairs = zip((-x - 1 for x in latency[::2]), latency[1::2], strict=True)
            for bucket, n in pairs:
                histogram[bucket] = histogram.get(bucket, 0) + n
        ranked = sorted(merged, key=lambda u: (-(percentile(merged[u], 0.95) or 0.0), u))[:10]
        users_of(ranked)
        return ranked

    return {
        "by_status (rollup)": status_breakdown,
        "top_users(requests) (rollup)": top_requests,
        "top_users(p95) (rollup, SQL ranking)": top_p95_sql,
        "top_users(p95) (rollup, Python ranking)": top_p95_python,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    arguments = parser.parse_args()
    store = SessionStore(arguments.url, settings=Settings(database_url=arguments.url))
    result: dict[str, Any] = {"backend": store.engine.dialect.name, "shards": arguments.shards}
    # The store's answers first: the probe's connection then holds SQLite's write lock.
    expected_p95 = [u.user_id for u in store.top_users(by="p95", limit=10)]
    expected_requests = [u.user_id for u in store.top_users(by="requests", limit=10)]
    expected = by_status(store).by_status
    with store.engine.connect() as connection:
        started = time.perf_counter()
        build(connection, arguments.shards)
        result["build_ms"] = (time.perf_counter() - started) * 1000
        result["rows"] = {
            name: connection.execute(text(f"SELECT count(*) FROM {name}")).scalar()
            for name in ("r_status", "r_user")
        }
        for name, call in reads(connection).items():
            answer = call()
            seconds = call_seconds(call, arguments.repeat)
            result[name] = {
                "median_ms": statistics.median(seconds) * 1000,
                "max_ms": max(seconds) * 1000,
            }
            if name.startswith("top_users(p95)"):
                result[name]["same_as_store"] = answer == expected_p95
            if name.startswith("top_users(requests)"):
                result[name]["same_as_store"] = answer == expected_requests
            if name.startswith("by_status"):
                totals, histograms = answer
                result[name]["same_as_store"] = all(
                    percentile_fields(histograms.get(s, {}))
                    == {
                        k: getattr(expected[s], k) for k in percentile_fields(histograms.get(s, {}))
                    }
                    and int(totals[s][0]) == expected[s].sessions
                    and int(totals[s][1]) == expected[s].request_count
                    for s in totals
                )
        connection.rollback()
    store.dispose()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
