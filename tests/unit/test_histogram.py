"""The latency histogram: buckets, and percentile estimates inside the documented bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions import histogram as h
from tests.support.reference_model import exact_percentile

in_range = st.floats(min_value=h.LOWEST, max_value=h.HIGHEST, exclude_max=True)


def test_the_scheme_spans_1_ms_to_1_hour_in_5_percent_steps() -> None:
    assert h.lower_edge(1) == pytest.approx(0.001)
    assert h.lower_edge(h.REGULAR_BUCKETS + 1) >= h.HIGHEST > h.lower_edge(h.REGULAR_BUCKETS)
    assert h.REGULAR_BUCKETS == 310
    assert math.isclose(h.RELATIVE_ERROR, 0.0247, abs_tol=1e-4)


@given(in_range)
def test_every_time_falls_in_the_bucket_whose_edges_hold_it(seconds: float) -> None:
    bucket = h.bucket_of(seconds)
    assert 1 <= bucket <= h.REGULAR_BUCKETS
    assert h.lower_edge(bucket) <= seconds
    if bucket < h.REGULAR_BUCKETS:
        assert seconds < h.lower_edge(bucket + 1)


def test_underflow_and_overflow() -> None:
    assert h.bucket_of(0.0) == h.bucket_of(0.000999) == h.UNDERFLOW
    assert h.bucket_of(3600.0) == h.bucket_of(86_400.0) == h.OVERFLOW
    assert h.percentile({h.UNDERFLOW: 3}, 0.5) == pytest.approx(0.0005)
    assert h.percentile({h.OVERFLOW: 1}, 0.99) == h.HIGHEST


@settings(max_examples=300)
@given(
    st.lists(in_range, min_size=1, max_size=400),
    st.sampled_from([0.5, 0.9, 0.95, 0.99, 1.0]),
)
def test_estimates_stay_within_the_relative_error_bound(
    samples: list[float], fraction: float
) -> None:
    exact = exact_percentile(samples, fraction)
    estimate = h.percentile(h.histogram(samples), fraction)
    assert estimate is not None
    assert abs(estimate - exact) <= h.RELATIVE_ERROR * exact * (1 + 1e-9)


@given(st.lists(in_range, max_size=50), st.lists(in_range, max_size=50))
def test_histograms_add_up(first: list[float], second: list[float]) -> None:
    merged = h.histogram(first)
    for bucket, count in h.histogram(second).items():
        merged[bucket] = merged.get(bucket, 0) + count
    assert merged == h.histogram(first + second)


def test_an_empty_histogram_has_no_percentile_and_fractions_are_checked() -> None:
    assert h.percentile({}, 0.5) is None
    with pytest.raises(ValueError, match="fraction"):
        h.percentile({1: 1}, 0)


@given(st.dictionaries(st.integers(h.UNDERFLOW, h.OVERFLOW), st.integers(1, 10**12), max_size=20))
def test_a_percentile_is_the_estimate_of_its_bucket(counts: dict[int, int]) -> None:
    for fraction in (0.5, 0.95, 0.99, 1.0):
        bucket = h.percentile_bucket(counts, fraction)
        if bucket is None:
            assert not counts and h.percentile(counts, fraction) is None
        else:
            assert bucket in counts
            assert h.percentile(counts, fraction) == h.representative(bucket)
