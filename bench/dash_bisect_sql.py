"""Forms of the overview's two histogram statements, timed against today's on one database
(not a test; the dash-bisect investigation, README "Dashboard page load").

Each form runs ``--repeat`` times after a warm-up (wall clock, rows fetched) and once under
``EXPLAIN (ANALYZE, BUFFERS)``; its rows are compared with today's form's, exactly (the
by-status rows as a sorted list, the ranking as the ordered list it is)::

    python -m bench.dash_bisect_sql --url postgresql://postgres@127.0.0.1:5432/<db> \
        [--forms today lateral_series ...] [--set work_mem=64MB ...] [--out file.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import psycopg

#: Where each live row's pairs come from: a FROM item naming ``l(key, value)`` and, for the
#: target-list forms, a derived table instead of ``sessions``.
SOURCES: dict[str, str] = {
    # today's: the inlined SQL function (generate_subscripts, every other subscript kept)
    "today": "sessions JOIN session_latency_buckets(sessions.latency) AS l ON true",
    # a LATERAL over every second subscript only (no filter of half the rows)
    "lateral_series": (
        "sessions JOIN LATERAL (SELECT CAST(-sessions.latency[i] - 1 AS integer) AS key,"
        " sessions.latency[i + 1] AS value"
        " FROM generate_series(1, cardinality(sessions.latency), 2) AS i) AS l ON true"
    ),
    # unnest WITH ORDINALITY in a LATERAL, odd positions kept, the count by subscript
    "lateral_unnest_ordinality": (
        "sessions JOIN LATERAL (SELECT CAST(-u.v - 1 AS integer) AS key,"
        " sessions.latency[u.o + 1] AS value"
        " FROM unnest(sessions.latency) WITH ORDINALITY AS u(v, o) WHERE u.o % 2 = 1) AS l"
        " ON true"
    ),
    # the subscripts generated in the target list (ProjectSet: no per-row function scan)
    "targetlist_series": (
        "(SELECT s.status, s.user_id, CAST(-s.latency[s.i] - 1 AS integer) AS key,"
        " s.latency[s.i + 1] AS value FROM (SELECT sessions.status, sessions.user_id,"
        " sessions.latency, generate_series(1, cardinality(sessions.latency), 2) AS i"
        " FROM sessions) AS s) AS sessions CROSS JOIN LATERAL (SELECT sessions.key,"
        " sessions.value) AS l"
    ),
    # a rewritten function (the same name's body with generate_series step 2), inlined
    "function_series": "sessions JOIN dashbisect_buckets_series(sessions.latency) AS l ON true",
    # a rewritten function over unnest WITH ORDINALITY (revision 0009's body), inlined
    "function_unnest": "sessions JOIN dashbisect_buckets_unnest(sessions.latency) AS l ON true",
}

FUNCTIONS = """
CREATE OR REPLACE FUNCTION dashbisect_buckets_series(h bigint[])
RETURNS TABLE (key integer, value bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CAST(-h[i] - 1 AS integer), h[i + 1] FROM generate_series(1, cardinality(h), 2) AS i
$$;
CREATE OR REPLACE FUNCTION dashbisect_buckets_unnest(h bigint[])
RETURNS TABLE (key integer, value bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CAST(-u.v - 1 AS integer), h[u.o + 1] FROM unnest(h) WITH ORDINALITY AS u(v, o)
     WHERE u.o % 2 = 1
$$
"""


def by_status(source: str) -> str:
    return (
        "SELECT sessions.status, CAST(l.key AS INTEGER) AS bucket, sum(l.value) AS sum_1"
        f" FROM {source} GROUP BY sessions.status, CAST(l.key AS INTEGER)"
    )


def rank_p95(source: str) -> str:
    return (
        "SELECT anon_1.user_id FROM (SELECT anon_2.user_id AS user_id, anon_2.bucket AS bucket,"
        " sum(anon_2.count) OVER (PARTITION BY anon_2.user_id ORDER BY anon_2.bucket) AS seen,"
        " sum(anon_2.count) OVER (PARTITION BY anon_2.user_id) AS total"
        " FROM (SELECT sessions.user_id AS user_id, CAST(l.key AS INTEGER) AS bucket,"
        " sum(l.value) AS count"
        f" FROM {source}"
        " WHERE sessions.user_id IS NOT NULL GROUP BY sessions.user_id, CAST(l.key AS INTEGER))"
        " AS anon_2) AS anon_1"
        " WHERE anon_1.seen >= CAST(0.95 AS double precision) * anon_1.total"
        " GROUP BY anon_1.user_id ORDER BY min(anon_1.bucket) DESC, anon_1.user_id LIMIT 10"
    )


STATEMENTS = {"by_status_buckets": by_status, "rank_p95": rank_p95}


def _nodes(plan: dict[str, Any], depth: int = 0) -> list[str]:
    label = plan["Node Type"]
    for key in ("Relation Name", "Function Name", "Sort Method", "Strategy"):
        if key in plan:
            label += f" {plan[key]}"
    if "Workers Launched" in plan:
        label += f" workers {plan['Workers Launched']}"
    label += f" (rows {plan.get('Actual Rows')}, {plan.get('Actual Total Time')} ms"
    if "Sort Space Used" in plan:
        label += f", sort {plan['Sort Space Type']} {plan['Sort Space Used']} kB"
    if "Peak Memory Usage" in plan:
        label += f", peak {plan['Peak Memory Usage']} kB"
    if "HashAgg Batches" in plan:
        label += f", batches {plan['HashAgg Batches']}"
    label += ")"
    out = ["  " * depth + label]
    for child in plan.get("Plans", []):
        out += _nodes(child, depth + 1)
    return out


def time_statement(connection: psycopg.Connection, sql: str, repeat: int) -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        rows = cursor.fetchall()  # warm
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            cursor.execute(sql)
            cursor.fetchall()
            seconds.append(time.perf_counter() - started)
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
        report = cursor.fetchone()[0][0]
    return {
        "median_ms": round(statistics.median(seconds) * 1000, 1),
        "all_ms": [round(s * 1000, 1) for s in seconds],
        "explain_ms": report["Execution Time"],
        "planning_ms": report["Planning Time"],
        "jit": report.get("JIT", {}).get("Timing"),
        "plan_cost": report["Plan"]["Total Cost"],
        "shared_hit": report["Plan"].get("Shared Hit Blocks"),
        "shared_read": report["Plan"].get("Shared Read Blocks"),
        "plan": _nodes(report["Plan"]),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--forms", nargs="+", default=list(SOURCES))
    parser.add_argument("--statements", nargs="+", default=list(STATEMENTS))
    parser.add_argument("--set", nargs="*", default=[], help="GUC=value for the session")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out")
    arguments = parser.parse_args()
    result: dict[str, Any] = {"url": arguments.url, "set": arguments.set, "forms": {}}
    with psycopg.connect(arguments.url, autocommit=True) as connection:
        connection.execute(FUNCTIONS)
        for setting in arguments.set:
            name, value = setting.split("=", 1)
            connection.execute(f"SET {name} = '{value}'")
        for statement, build in STATEMENTS.items():
            if statement not in arguments.statements:
                continue
            reference = None
            for form in arguments.forms:
                found = time_statement(connection, build(SOURCES[form]), arguments.repeat)
                rows = found.pop("rows")
                key = sorted(rows) if statement == "by_status_buckets" else rows
                if reference is None:
                    reference = key
                found["rows"] = len(rows)
                found["same_rows_as_first"] = key == reference
                result["forms"][f"{statement}/{form}"] = found
                jit_ms = (found["jit"] or {}).get("Total", 0)
                print(
                    f"{statement:18} {form:26} median {found['median_ms']:8.1f} ms"
                    f" explain {found['explain_ms']:8.1f} ms rows {len(rows)}"
                    f" cost {found['plan_cost']:9.0f} jit {jit_ms:6.1f} ms"
                    f" same {found['same_rows_as_first']}",
                    flush=True,
                )
    if arguments.out:
        with open(arguments.out, "w") as file:
            json.dump(result, file, indent=1, default=str)


if __name__ == "__main__":
    main()
