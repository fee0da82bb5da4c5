"""The apply's per-event Python, spelled out for speed, against its plain form.

``Delta.add`` inlines ``touch`` and ``bucket_of`` and skips counters an event leaves at
zero; ``_latency_literal`` formats pairs from ready texts. Each must give exactly what the
plain form gives (the store tests check the database side of both).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.apply import Delta, _latency_literal
from sessions.events import RecordEvent
from sessions.histogram import OVERFLOW, bucket_of
from sessions.records import COUNTERS
from sessions.rules import MAX_COST, MAX_PROCESSING_TIME, MAX_TOKENS
from sessions.tables import latency_pairs

START = datetime(2026, 1, 1, tzinfo=UTC)


def plain_add(delta: Delta, event: RecordEvent) -> None:
    """``Delta.add`` as it was written before it was spelled out."""
    delta.request_count += event.counts_request
    delta.error_count += event.error
    delta.total_processing_time += event.processing_time
    delta.input_tokens += event.input_tokens
    delta.output_tokens += event.output_tokens
    delta.cost += event.cost
    if event.counts_request:
        bucket = bucket_of(event.processing_time)
        delta.latency[bucket] = delta.latency.get(bucket, 0) + 1
    delta.touch(event.at)
    if delta.user_id is None:
        delta.user_id = event.user_id


# Edges of the scheme, zero, negative zero, the bounds, and any float in between.
SECONDS = st.one_of(
    st.sampled_from([0.0, -0.0, 0.001, 0.00099999, 3600.0, 3599.999, MAX_PROCESSING_TIME]),
    st.floats(min_value=0, max_value=MAX_PROCESSING_TIME),
)
records = st.builds(
    lambda offset, user, seconds, error, counts, tokens_in, tokens_out, cost: RecordEvent(
        session_id="s-1",
        at=START + timedelta(microseconds=offset),
        user_id=user,
        processing_time=seconds,
        error=error,
        counts_request=counts,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost=cost,
    ),
    st.integers(min_value=-(10**9), max_value=10**9),
    st.one_of(st.none(), st.sampled_from(["owner-a", "owner-b"])),
    SECONDS,
    st.booleans(),
    st.booleans(),
    st.one_of(st.just(0), st.integers(min_value=0, max_value=MAX_TOKENS)),
    st.one_of(st.just(0), st.integers(min_value=0, max_value=MAX_TOKENS)),
    st.one_of(st.sampled_from([0.0, -0.0]), st.floats(min_value=0, max_value=MAX_COST)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=12), st.booleans())
def test_add_sums_counts_and_spans_exactly_as_the_plain_form(
    events: list[RecordEvent], touched_first: bool
) -> None:
    fast, plain = Delta(), Delta()
    if touched_first:  # a message's activity may open a delta before its records
        fast.touch(START)
        plain.touch(START)
    for event in events:
        fast.add(event)
        plain_add(plain, event)
    for name in (*COUNTERS, "first_at", "last_at", "user_id", "latency"):
        got, expected = getattr(fast, name), getattr(plain, name)
        assert got == expected, name
        assert type(got) is type(expected), name  # an int stays an int, a float a float
    # Bit for bit: the same float additions in the same order (and 0.0, never -0.0).
    assert repr(fast.total_processing_time) == repr(plain.total_processing_time)
    assert repr(fast.cost) == repr(plain.cost)


@given(
    st.dictionaries(
        st.integers(min_value=0, max_value=OVERFLOW), st.integers(min_value=1, max_value=2**62)
    )
)
def test_the_latency_literal_is_the_text_of_the_pairs(histogram: dict[int, int]) -> None:
    expected = "{" + ",".join(map(str, latency_pairs(histogram))) + "}" if histogram else None
    assert _latency_literal(histogram) == expected
