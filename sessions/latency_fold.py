"""SQLite's latency histograms merged in Python rather than by ``json_each`` in SQL.

On SQLite a run's histogram is a JSON object ``{"bucket": count}`` (``LatencyHistogram``).
Merging many of them in SQL unfolds every row with ``json_each`` and groups the pairs; the
dashboard overview does it twice over every session (the buckets by status, and the ranking
of users by p95 with two window functions over the (user, bucket) groups), which on 100,000
sessions, 432,290 pairs, took most of its time. Reading the texts and merging them here
(``json.loads`` and one dict per group) gives the same histograms 2-2.5 times faster
(README, Performance, "Dashboard page load"). PostgreSQL keeps its statements (its arrays
unfolded by revision 0009's ``unnest``): the fold was neither needed nor measured there.

The results are the statements' exactly: the same rows (live runs with a histogram, under
the same conditions), the same buckets (SQL casts each key to an integer, :func:`fold` too),
the same nearest rank (:func:`sessions.histogram.percentile_bucket`; SQL's
``seen >= fraction * total`` is the same test for whole counts) and the same order (bucket
descending, then user id: SQLite compares text byte by byte, which for UTF-8 is Python's
order of code points).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Text, select, type_coerce

from sessions.histogram import percentile_bucket
from sessions.tables import sessions_table

#: Histogram texts :func:`fold` parses in one ``json.loads`` (rows of any keys).
TEXTS_PER_PARSE = 1_000


def folds_in_python(connection: Connection) -> bool:
    """Whether merges of many histograms read on ``connection`` are made by :func:`fold`
    (SQLite) rather than by the SQL of ``sessions.queries`` (PostgreSQL)."""
    return connection.dialect.name == "sqlite"


def latency_texts(key: ColumnElement[Any], where: list[ColumnElement[bool]]) -> Select[Any]:
    """``(key, histogram as stored)`` of the selected sessions that have one: the JSON text
    itself, not ``LatencyHistogram``'s dict, whose per-bucket conversions :func:`fold` would
    only repeat."""
    latency = sessions_table.c.latency
    return select(key, type_coerce(latency, Text)).where(*where, latency.is_not(None))


def fold(rows: Iterable[Sequence[Any]]) -> dict[Any, dict[int, int]]:
    """``(key, JSON histogram)`` rows merged into one histogram (bucket -> count) per key;
    keys with no bucket at all are left out, as grouping the unfolded pairs leaves them out.

    The texts are parsed :data:`TEXTS_PER_PARSE` rows at a time, whatever their keys, in one
    ``json.loads`` of them as one JSON array: most histograms hold a few buckets, so one call
    per row costs more in calls than in parsing (on 100,000 rows 270 ms against 90), while a
    bounded batch keeps a large store's parsed histograms from all being in memory at once,
    with few keys (statuses) or many (users). Buckets are merged under their text (one dict
    look-up per pair) and made integers once per key and bucket at the end.
    """
    merged: dict[Any, dict[str, int]] = {}
    keys: list[Any] = []
    texts: list[str] = []
    for key, text in rows:
        keys.append(key)
        texts.append(text)
        if len(texts) == TEXTS_PER_PARSE:
            _add_texts(merged, keys, texts)
            keys.clear()
            texts.clear()
    _add_texts(merged, keys, texts)
    return {key: _by_bucket(counts) for key, counts in merged.items() if counts}


def _add_texts(into: dict[Any, dict[str, int]], keys: list[Any], texts: list[str]) -> None:
    """Add the counts of ``texts`` (JSON histograms) to ``into[key]`` of each one's key,
    bucket by bucket."""
    if not texts:
        return
    for key, histogram in zip(keys, json.loads(f"[{','.join(texts)}]"), strict=True):
        counts = into.get(key)
        if counts is None:
            counts = into[key] = {}
        for bucket, count in histogram.items():
            counts[bucket] = counts.get(bucket, 0) + count


def _by_bucket(counts: Mapping[str, int]) -> dict[int, int]:
    """Counts under bucket texts as counts under bucket numbers (two texts of one number,
    which the writers never make, are added up, as SQL's cast and grouping would)."""
    found: dict[int, int] = {}
    for bucket, count in counts.items():
        number = int(bucket)
        found[number] = found.get(number, 0) + count
    return found


def rank_by_percentile(
    histograms: Mapping[str, Mapping[int, int]], fraction: float, limit: int
) -> list[str]:
    """The ``limit`` users whose ``fraction`` percentile is in the highest bucket, ties by
    user id: what ``sessions.queries.rank_users(by="p95")`` selects, from histograms that
    :func:`fold` merged per user."""
    ranked = (
        (-bucket, user)
        for user, counts in histograms.items()
        if (bucket := percentile_bucket(counts, fraction)) is not None
    )
    return [user for _, user in heapq.nsmallest(limit, ranked)]
