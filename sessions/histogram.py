"""A fixed log-scale histogram of processing times, and percentiles estimated from it.

Raw samples are never kept: each ``record`` adds one to the count of its bucket, so a
histogram is additive (apply and merge by summing counts, in SQL as in Python) and
idempotent under the same ledger as every other counter.

Buckets grow by :data:`GROWTH` (5 %) from :data:`LOWEST` (1 ms) up to :data:`HIGHEST` (1 hour),
with one underflow bucket below and one overflow bucket above. A percentile is estimated as
the geometric middle of the bucket holding the sample of that rank (nearest-rank
definition), so for samples between 1 ms and 1 hour the estimate is within
:data:`RELATIVE_ERROR` (``sqrt(1.05) - 1``, about 2.47 %) of the exact percentile. Below 1 ms the
estimate is 0.5 ms (absolute error under 0.5 ms); at or above 1 hour it is 1 hour (a lower
bound: the events model caps one request at a day).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping

#: Lower edge of the first regular bucket, in seconds.
LOWEST = 0.001
#: Upper edge of the last regular bucket, in seconds.
HIGHEST = 3600.0
#: Each bucket is this much wider than the one before.
GROWTH = 1.05
#: Regular buckets between LOWEST and HIGHEST.
REGULAR_BUCKETS = math.ceil(math.log(HIGHEST / LOWEST) / math.log(GROWTH))
#: Bucket index of samples below LOWEST.
UNDERFLOW = 0
#: Bucket index of samples at or above HIGHEST.
OVERFLOW = REGULAR_BUCKETS + 1
#: Worst relative error of an estimate for samples in [LOWEST, HIGHEST).
RELATIVE_ERROR = math.sqrt(GROWTH) - 1


def lower_edge(bucket: int) -> float:
    """The smallest time in a regular ``bucket``."""
    return LOWEST * GROWTH ** (bucket - 1)


#: The lower edge of every regular bucket, in order: bucket ``b`` holds the times from
#: ``_EDGES[b - 1]`` up to (not including) ``_EDGES[b]``.
_EDGES = tuple(lower_edge(bucket) for bucket in range(1, REGULAR_BUCKETS + 1))
#: The same edges, for a caller that inlines :func:`bucket_of` in a per-event loop
#: (``sessions.apply.Delta.add``): ``bisect_right(EDGES, s)`` below :data:`HIGHEST`.
EDGES = _EDGES


def bucket_of(seconds: float) -> int:
    """The bucket a processing time falls in: 0 (underflow), 1..REGULAR_BUCKETS, OVERFLOW.

    A binary search of the edges: exact at every edge (no rounding of a logarithm) and a
    less than half its cost, which matters because every applied ``record`` pays it.
    """
    if seconds >= HIGHEST:
        return OVERFLOW
    return bisect_right(_EDGES, seconds)


def representative(bucket: int) -> float:
    """The estimate reported for samples in ``bucket``: its geometric middle."""
    if bucket <= UNDERFLOW:
        return LOWEST / 2
    if bucket >= OVERFLOW:
        return HIGHEST
    return min(lower_edge(bucket) * math.sqrt(GROWTH), HIGHEST)


def percentile_bucket(counts: Mapping[int, int], fraction: float) -> int | None:
    """The bucket holding the ``fraction`` percentile (0 < fraction <= 1, nearest rank) of a
    histogram: the first, in bucket order, whose running count reaches
    ``ceil(fraction * total)``. ``None`` for an empty histogram.

    Apart from :func:`percentile` because buckets sort as their estimates do: ranking by
    bucket ranks by percentile (``sessions.queries``'s ranking by p95 does it in SQL, and
    ``sessions.latency_fold`` in Python with this function).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: must be in (0, 1], got {fraction}")
    total = sum(counts.values())
    if total == 0:
        return None
    rank = math.ceil(fraction * total)
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return bucket
    raise AssertionError("unreachable: the ranks add up to the total")  # pragma: no cover


def percentile(counts: Mapping[int, int], fraction: float) -> float | None:
    """The ``fraction`` percentile (0 < fraction <= 1, nearest rank) of a histogram.

    ``None`` for an empty histogram.
    """
    bucket = percentile_bucket(counts, fraction)
    return None if bucket is None else representative(bucket)


def histogram(samples: Iterable[float]) -> dict[int, int]:
    """Bucket counts of ``samples`` (what the store accumulates, in Python)."""
    counts: dict[int, int] = {}
    for seconds in samples:
        bucket = bucket_of(seconds)
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts
