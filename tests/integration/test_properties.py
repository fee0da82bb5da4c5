"""Hypothesis properties: ``apply`` agrees with the plain-Python reference model.

Any list of events, split into batches in any way, with any batches delivered again:

* delivered in order, the store holds exactly the reference's sessions (live rows and
  archived runs, every column, and every run's latency histogram) and per-minute activity,
  and every ``apply`` reports what the reference reports;
* delivered in any order, per session and over all its runs, every counter sum, bucket
  count and the latest activity, and the per-minute activity, still equal the reference's.

Each delivery hands the store the batch as a Python caller does (the model) or as a worker
takes it off the broker (its JSON text, which for a batch of records only is read without
models, by ``sessions.wire_records``), drawn delivery by delivery: a batch applied one way
and redelivered the other is still a duplicate (its digest the same).

Times are whole minutes from a fixed instant (so ties, the boundary cases of the run
rules, are frequent), and processing time and cost are multiples of 1/64, so every float
sum is exact in any order.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent, encode_message
from sessions.store import SessionStore
from sessions.tables import ERROR_RATE_BOUND_MAX, minute_start
from tests.integration.support import (
    activity_rows,
    at,
    cut_into_batches,
    latency_rows,
    live_rows,
    reset,
    run_rows,
    with_redeliveries,
)
from tests.support.reference_model import ReferenceStore, session_totals

SESSION_IDS = st.sampled_from(["user-1", "user-2", "temp-3"])
USER_IDS = st.one_of(st.none(), st.sampled_from(["owner-a", "owner-b"]))
MINUTES = st.integers(min_value=0, max_value=12)
SIXTY_FOURTHS = st.integers(min_value=0, max_value=256).map(lambda n: n / 64)

records = st.builds(
    lambda session_id, minute, user_id, processing_time, error, counts, tokens, cost: RecordEvent(
        session_id=session_id,
        at=at(minute),
        user_id=user_id,
        processing_time=processing_time,
        error=error,
        counts_request=counts,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cost=cost,
    ),
    SESSION_IDS,
    MINUTES,
    USER_IDS,
    SIXTY_FOURTHS,
    st.booleans(),
    st.sampled_from([True, True, True, False]),
    st.tuples(st.integers(0, 50), st.integers(0, 50)),
    SIXTY_FOURTHS,
)
creates = st.builds(
    lambda session_id, minute, user_id, metadata: CreateEvent(
        session_id=session_id, at=at(minute), user_id=user_id, metadata=metadata
    ),
    SESSION_IDS,
    MINUTES,
    USER_IDS,
    st.one_of(st.none(), st.just({}), st.builds(lambda n: {"n": n}, st.integers(0, 3))),
)
ends = st.builds(
    lambda session_id, minute, status: EndEvent(
        session_id=session_id, at=at(minute), status=status
    ),
    SESSION_IDS,
    MINUTES,
    st.sampled_from(["completed", "failed", "expired"]),
)
events_lists = st.lists(st.one_of(records, records, creates, ends), max_size=24)

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def batches(draw: st.DrawFn) -> list[Batch]:
    """``events`` cut into consecutive batches at arbitrary points."""
    return cut_into_batches(draw, draw(events_lists))


@st.composite
def in_order_deliveries(draw: st.DrawFn) -> list[Batch]:
    """Every batch in order, and after any of them redeliveries of earlier ones."""
    return with_redeliveries(draw, draw(batches()))


@st.composite
def any_order_deliveries(draw: st.DrawFn) -> tuple[list[Batch], list[Batch]]:
    """(batches in produced order, the same batches plus redeliveries in any order)."""
    produced = draw(batches())
    extra = draw(st.lists(st.sampled_from(produced), max_size=4)) if produced else []
    return produced, draw(st.permutations([*produced, *extra]))


def _over_runs(latency: dict[tuple[str, int, int], int]) -> dict[tuple[str, int], int]:
    """Bucket counts per (session id, bucket), summed over the session's runs."""
    summed: dict[tuple[str, int], int] = {}
    for (session_id, _, bucket), count in latency.items():
        summed[session_id, bucket] = summed.get((session_id, bucket), 0) + count
    return summed


def _checked_bounds(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``rows`` without ``error_rate_bound``, once each is checked to be what the health
    sweep's index needs: no lower than sixteen times the error rate (or the cap, above a rate
    of 1), at most three sixteenths above it, and 0 without requests."""
    for session_id, row in rows.items():
        bound, errors, requests = row["error_rate_bound"], row["error_count"], row["request_count"]
        if requests == 0:
            assert bound == 0, session_id
        else:
            assert bound == ERROR_RATE_BOUND_MAX or 16 * errors <= bound * requests, session_id
            assert 16 * errors >= (bound - 3) * requests, session_id
    return {
        session_id: {k: v for k, v in row.items() if k != "error_rate_bound"}
        for session_id, row in rows.items()
    }


def _with_minutes(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The reference's live rows with the minute of their activity that the idle sweep's
    index holds (not their ``error_rate_bound``: it depends on how events were batched)."""
    return {
        session_id: {**row, "last_activity_minute": minute_start(row["last_activity"])}
        for session_id, row in rows.items()
    }


def _delivered(batch: Batch, data: st.DataObject) -> Batch | str:
    """``batch`` as the model, or as the JSON text a worker takes off the broker."""
    return encode_message(batch.to_message()) if data.draw(st.booleans(), "as text") else batch


def _applied(result: Any) -> tuple[int, int]:
    assert result.rejected == 0
    return result.applied, result.duplicate


@PROPERTY_SETTINGS
@given(deliveries=in_order_deliveries(), data=st.data())
def test_in_order_delivery_gives_exactly_the_reference_sessions(
    store: SessionStore, deliveries: list[Batch], data: st.DataObject
) -> None:
    reset(store)
    reference = ReferenceStore()
    for batch in deliveries:
        applied = store.apply(_delivered(batch, data))
        assert _applied(applied) == _applied(reference.apply(batch))
    assert _checked_bounds(live_rows(store)) == _with_minutes(reference.live_rows())
    assert run_rows(store) == reference.archived_rows()
    assert latency_rows(store) == reference.latency_rows()
    assert activity_rows(store) == reference.minutes


@PROPERTY_SETTINGS
@given(plan=any_order_deliveries(), data=st.data())
def test_any_order_delivery_keeps_every_sum_and_the_latest_activity(
    store: SessionStore, plan: tuple[list[Batch], list[Batch]], data: st.DataObject
) -> None:
    produced, deliveries = plan
    reset(store)
    reference = ReferenceStore()
    reference.apply_all(produced)
    results = [_applied(store.apply(_delivered(batch, data))) for batch in deliveries]
    stored = session_totals([*live_rows(store).values(), *run_rows(store).values()])
    assert stored == reference.totals()
    assert _over_runs(latency_rows(store)) == _over_runs(reference.latency_rows())
    assert activity_rows(store) == reference.minutes
    # Each batch applied once, whatever the order: the rest were duplicates.
    assert sum(applied for applied, _ in results) == sum(len(b.events) for b in produced)
