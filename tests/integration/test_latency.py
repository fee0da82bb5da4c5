"""Latency histograms and per-minute activity: written exactly once, with the counters.

The percentiles a reader gets are checked against exact nearest-rank percentiles of the raw
processing times, inside the bucket scheme's documented bound, whichever apply path the
events took (records-only batches take the fast path; a create or an end sends a session's
batch down the slow path) and however often batches are delivered again.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessions import histogram as h
from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent
from sessions.records import PERCENTILES
from sessions.store import SessionStore
from tests.integration.support import (
    activity_rows,
    at,
    batch,
    create,
    cut_into_batches,
    end,
    latency_rows,
    record,
    reset,
    snapshot,
    with_redeliveries,
)
from tests.support.reference_model import exact_percentile

#: Processing times the bound holds for: from 1 ms up to (not including) 1 hour.
IN_RANGE = st.floats(min_value=h.LOWEST, max_value=h.HIGHEST, exclude_max=True)
SESSIONS = ("user-1", "user-2", "temp-3")


def assert_within_bound(estimate: float | None, samples: list[float], fraction: float) -> None:
    exact = exact_percentile(samples, fraction)
    assert estimate is not None
    assert abs(estimate - exact) <= h.RELATIVE_ERROR * exact * (1 + 1e-9), (fraction, exact)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[dict[str, list[float]], list[Batch]]:
    """Requests with random times over a few sessions, cut into batches, some delivered twice.

    Half the time every session is also created first and ended last, so the batches holding
    those take the slow path and the others the fast one.
    """
    requests = draw(
        st.lists(st.tuples(st.sampled_from(SESSIONS), IN_RANGE), min_size=1, max_size=60)
    )
    events: list[CreateEvent | RecordEvent | EndEvent] = [
        record(session_id, n / 100, processing_time=seconds)
        for n, (session_id, seconds) in enumerate(requests)
    ]
    samples: dict[str, list[float]] = {}
    for session_id, seconds in requests:
        samples.setdefault(session_id, []).append(seconds)
    if draw(st.booleans()):
        events = [
            *(create(session_id, -1, user_id="owner") for session_id in samples),
            *events,
            *(end(session_id, 1) for session_id in samples),
        ]
    return samples, with_redeliveries(draw, cut_into_batches(draw, events))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=deliveries())
def test_percentiles_are_within_the_bound_of_the_exact_ones(
    store: SessionStore, plan: tuple[dict[str, list[float]], list[Batch]]
) -> None:
    samples, delivered = plan
    reset(store)
    for produced in delivered:
        store.apply(produced)
    everything = [seconds for times in samples.values() for seconds in times]
    total = store.aggregate()
    assert total.request_count == len(everything)
    for name, fraction in PERCENTILES.items():
        assert_within_bound(getattr(total, name), everything, fraction)
        for session_id, times in samples.items():
            session = store.get(session_id)
            assert session is not None and session.request_count == len(times)
            assert_within_bound(getattr(session, name), times, fraction)


def test_a_batch_delivered_again_changes_no_histogram_and_no_minute(store: SessionStore) -> None:
    fast = batch(record("s", 0, processing_time=0.2), record("t", 0, processing_time=3.0))
    slow = batch(create("s", 1), record("s", 1, processing_time=0.7), end("s", 2))
    store.apply(fast)
    store.apply(slow)
    before = snapshot(store)
    assert sum(before["latency"].values()) == 3
    assert store.apply(fast).duplicate == 2 and store.apply(slow).duplicate == 3
    assert snapshot(store) == before


def test_a_new_run_starts_with_an_empty_histogram(store: SessionStore) -> None:
    store.apply(batch(*(record("s", n, processing_time=2.0) for n in range(3)), end("s", 3)))
    store.apply(batch(create("s", 4)))
    fresh = store.get("s")
    assert fresh is not None and (fresh.run, fresh.request_count) == (2, 0)
    assert (fresh.processing_time_p50, fresh.processing_time_p99) == (None, None)

    store.apply(batch(record("s", 5, processing_time=0.01)))
    second = store.get("s")
    assert second is not None and second.processing_time_p99 is not None
    assert abs(second.processing_time_p99 - 0.01) <= h.RELATIVE_ERROR * 0.01
    assert latency_rows(store) == {
        ("s", 1, h.bucket_of(2.0)): 3,
        ("s", 2, h.bucket_of(0.01)): 1,
    }


def test_a_late_record_lands_in_the_histogram_of_the_run_live_at_its_time(
    store: SessionStore,
) -> None:
    store.apply(batch(create("s", 0), end("s", 1), create("s", 2)))
    store.apply(batch(record("s", 0.5, processing_time=9.0), record("s", 3, processing_time=1.0)))
    assert latency_rows(store) == {
        ("s", 1, h.bucket_of(9.0)): 1,
        ("s", 2, h.bucket_of(1.0)): 1,
    }


def test_a_time_without_a_request_is_no_sample(store: SessionStore) -> None:
    """As for ``request_count``: the guide's ``increment_requests=False`` adds no request."""
    no_request = RecordEvent(session_id="s", at=at(0), processing_time=30.0, counts_request=False)
    store.apply(batch(no_request))
    session = store.get("s")
    assert session is not None and session.processing_time_p50 is None
    store.apply(batch(record("s", 1, processing_time=0.3)))
    assert latency_rows(store) == {("s", 1, h.bucket_of(0.3)): 1}


def test_requests_under_a_millisecond_count_in_the_underflow_bucket(store: SessionStore) -> None:
    """Bucket 0 in every row of a batch: the fast path's bucket column is all zeros."""
    store.apply(batch(*(record(f"s{n}", 0, processing_time=0.0) for n in range(3))))
    store.apply(batch(record("s0", 1, processing_time=0.0004)))
    assert latency_rows(store) == {("s0", 1, 0): 2, ("s1", 1, 0): 1, ("s2", 1, 0): 1}
    session = store.get("s0")
    assert session is not None and session.processing_time_p99 == h.LOWEST / 2


def test_every_event_counts_in_the_minute_of_its_time(store: SessionStore) -> None:
    store.apply(
        batch(
            create("s", 0.2),
            record("s", 0.5),
            record("s", 0.9, error=True),
            record("t", 1.0, error=True),
            RecordEvent(session_id="t", at=at(1.5), error=True, counts_request=False),
            end("s", 3.99),
        )
    )
    assert activity_rows(store) == {at(0): (3, 2, 1), at(1): (2, 1, 2), at(3): (1, 0, 0)}


def test_purge_removes_the_histograms_of_purged_runs_and_old_minutes(store: SessionStore) -> None:
    store.apply(batch(record("gone", 0, processing_time=1.0), end("gone", 1)))
    store.apply(batch(create("pooled", 0), record("pooled", 0, processing_time=2.0)))
    store.apply(batch(end("pooled", 1), create("pooled", 2), record("pooled", 2)))
    store.apply(batch(record("kept", 0, processing_time=3.0), record("kept", 100)))

    result = store.purge(ended_before=at(50), ledger_before=at(0))
    assert (result.sessions, result.runs, result.latency, result.minutes) == (1, 1, 2, 3)
    assert latency_rows(store) == {
        ("pooled", 2, h.bucket_of(0.5)): 1,
        ("kept", 1, h.bucket_of(3.0)): 1,
        ("kept", 1, h.bucket_of(0.5)): 1,
    }
    assert list(activity_rows(store)) == [at(100)]
