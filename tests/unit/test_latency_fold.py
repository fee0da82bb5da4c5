"""``sessions.latency_fold`` against plain references: merged histograms are sums of
counts, and the ranking is a full sort by (p95 bucket descending, user id)."""

from __future__ import annotations

import json
import math
from collections import Counter
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from sessions import histogram as h
from sessions import latency_fold
from sessions.latency_fold import fold, rank_by_percentile

HISTOGRAMS = st.dictionaries(
    st.sampled_from([0, 1, 5, 6, h.OVERFLOW]) | st.integers(h.UNDERFLOW, h.OVERFLOW),
    st.integers(1, 3) | st.integers(1, 2**50),
    max_size=5,
)
KEYS = st.sampled_from(["a", "b", "c", "user-1", "user-10", "Z", "é"])


def _p95_bucket(counts: dict[int, int]) -> int:
    """The p95 bucket as the SQL ranking finds it: the least bucket whose running count is
    at least ``0.95 * total``."""
    total, seen = sum(counts.values()), 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= 0.95 * total:
            return bucket
    raise AssertionError("unreachable")


@given(st.lists(st.tuples(KEYS, HISTOGRAMS), max_size=30))
def test_fold_sums_each_keys_counts(rows: list[tuple[str, dict[int, int]]]) -> None:
    texts = [(key, json.dumps({str(b): n for b, n in counts.items()})) for key, counts in rows]
    expected: dict[str, Counter[int]] = {}
    for key, counts in rows:
        expected.setdefault(key, Counter()).update(counts)
    for per_parse in (1, 2, 3, latency_fold.TEXTS_PER_PARSE):  # batches' edges
        with mock.patch.object(latency_fold, "TEXTS_PER_PARSE", per_parse):
            assert fold(texts) == {key: dict(c) for key, c in expected.items() if c}


@given(st.dictionaries(KEYS, HISTOGRAMS), st.integers(1, 10))
def test_the_ranking_is_a_sort_by_p95_bucket_then_user(
    histograms: dict[str, dict[int, int]], limit: int
) -> None:
    ranked = sorted((-_p95_bucket(c), user) for user, c in histograms.items() if c)
    assert rank_by_percentile(histograms, 0.95, limit) == [user for _, user in ranked[:limit]]


def test_the_nearest_rank_is_the_sqls_test_for_whole_counts() -> None:
    for total in range(1, 2_000):
        assert math.ceil(0.95 * total) == min(n for n in range(total + 1) if n >= 0.95 * total)
