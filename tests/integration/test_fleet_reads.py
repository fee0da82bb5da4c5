"""The operators' reads over many sessions: percentiles per page, windows, top users, activity."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from sessions import histogram as h
from sessions.store import MAX_ACTIVITY_MINUTES, SessionStore
from tests.integration.support import at, batch, create, end, record


def estimate(seconds: float) -> float:
    """What a percentile reads as when ``seconds`` is the sample of its rank."""
    return h.representative(h.bucket_of(seconds))


@pytest.fixture
def fleet(store: SessionStore) -> SessionStore:
    """Three users and an anonymous session; u3's live run is its second.

    ===== ======= ================================= ======== ====== ===== ===========
    user  session requests (seconds) at minute       errors   cost   ended live p95
    ===== ======= ================================= ======== ====== ===== ===========
    u1    a       0.1, 0.2, 0.3 at 0, 1, 2            1        0.3
    u1    b       1.0, 1.0 at 10, 11                  0        1.0
    u2    c       2.0 x 6 at 20 .. 25                 3        1.2    26
    -     anon    0.05 x 10 at 30                     0        0
    u3    d       run 1: 3000.0 at 40 (ended 41); run 2: 0.01 at 43
    ===== ======= ================================= ======== ====== ===== ===========
    """
    store.apply(
        batch(
            *(
                record("a", n, user_id="u1", processing_time=s, error=n == 0, cost=0.1)
                for n, s in enumerate((0.1, 0.2, 0.3))
            ),
            *(record("b", n, user_id="u1", processing_time=1.0, cost=0.5) for n in (10, 11)),
            *(
                record("c", n, user_id="u2", processing_time=2.0, error=n % 2 == 0, cost=0.2)
                for n in range(20, 26)
            ),
            end("c", 26),
            *(record("anon", 30 + n / 20, processing_time=0.05) for n in range(10)),
        )
    )
    store.apply(batch(record("d", 40, user_id="u3", processing_time=3000.0), end("d", 41)))
    store.apply(batch(create("d", 42), record("d", 43, processing_time=0.01)))
    return store


def test_each_session_of_a_page_has_its_own_percentiles(fleet: SessionStore) -> None:
    page = {s.session_id: s for s in fleet.list_sessions()}
    assert [page["a"].processing_time_p50, page["a"].processing_time_p99] == [
        estimate(0.2),
        estimate(0.3),
    ]
    assert page["c"].processing_time_p95 == estimate(2.0)
    assert page["d"].processing_time_p99 == estimate(0.01)  # the live run's, not run 1's
    assert fleet.get("a") == page["a"]
    assert fleet.unhealthy() == [page["a"]]  # one error in three requests


def test_aggregate_merges_the_histograms_of_the_selected_sessions(fleet: SessionStore) -> None:
    u1 = fleet.aggregate(user_id="u1")
    assert (u1.sessions, u1.request_count) == (2, 5)
    # Ranks 3, 5 and 5 of 0.1, 0.2, 0.3, 1.0, 1.0.
    assert (u1.processing_time_p50, u1.processing_time_p95, u1.processing_time_p99) == (
        estimate(0.3),
        estimate(1.0),
        estimate(1.0),
    )
    everyone = fleet.aggregate()
    assert everyone.request_count == 3 + 2 + 6 + 10 + 1
    assert everyone.processing_time_p50 == estimate(0.05)  # rank 11 of 22: 0.01, 10 x 0.05
    assert everyone.processing_time_p99 == estimate(2.0)  # run 1's 3000 s is not live
    assert fleet.aggregate(user_id="nobody").processing_time_p50 is None


def test_since_and_until_select_by_last_activity(fleet: SessionStore) -> None:
    window = fleet.aggregate(since=at(11), until=at(26))  # b (11) in; c (26) out
    assert (window.sessions, window.request_count) == (1, 2)
    assert window.processing_time_p50 == estimate(1.0)
    assert fleet.aggregate(since=at(26)).sessions == 3  # c, anon, d
    assert fleet.aggregate(until=at(11)).sessions == 1  # a
    ended = fleet.aggregate(status="completed", since=at(20), until=at(27))
    assert (ended.sessions, ended.error_count) == (1, 3)
    assert fleet.aggregate(user_id="u1", since=at(12)).sessions == 0


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("requests", ["u2", "u1", "u3"]),
        ("errors", ["u2", "u1", "u3"]),
        ("cost", ["u1", "u2", "u3"]),
        ("p95", ["u2", "u1", "u3"]),  # u3's run 1 (3000 s) is not its live run
    ],
)
def test_top_users_rank_by_each_measure(fleet: SessionStore, by: str, expected: list[str]) -> None:
    top = fleet.top_users(by)  # type: ignore[arg-type]
    assert [u.user_id for u in top] == expected  # the anonymous session is nobody's
    assert [u.user_id for u in fleet.top_users(by, limit=2)] == expected[:2]  # type: ignore[arg-type]


def test_a_top_user_carries_the_same_figures_as_their_aggregate(fleet: SessionStore) -> None:
    for user in fleet.top_users("p95"):
        assert (
            user.model_dump(exclude={"user_id"})
            == fleet.aggregate(user_id=user.user_id).model_dump()
        )


def test_top_users_in_a_window(fleet: SessionStore) -> None:
    assert [u.user_id for u in fleet.top_users("cost", since=at(26))] == ["u2", "u3"]
    late = fleet.top_users("requests", since=at(20), until=at(30))
    assert [(u.user_id, u.request_count, u.sessions) for u in late] == [("u2", 6, 1)]
    assert fleet.top_users(until=at(0)) == []


def test_ties_rank_by_user_id(store: SessionStore) -> None:
    store.apply(batch(*(record(f"s-{u}", 0, user_id=u, processing_time=1.0) for u in "cab")))
    assert [u.user_id for u in store.top_users("p95")] == ["a", "b", "c"]


def test_activity_counts_events_requests_and_errors_per_minute(fleet: SessionStore) -> None:
    minutes = fleet.activity(at(0.5), until=at(3))  # since rounds down to its minute
    assert [(m.minute, m.events, m.requests, m.errors) for m in minutes] == [
        (at(0), 1, 1, 1),
        (at(1), 1, 1, 0),
        (at(2), 1, 1, 0),
    ]
    assert [(m.events, m.requests) for m in fleet.activity(at(26), until=at(28))] == [
        (1, 0),  # the end of c
        (0, 0),
    ]
    assert fleet.activity(at(30), until=at(31))[0].requests == 10


def test_activity_counts_the_runs_active_at_some_time_in_each_minute(fleet: SessionStore) -> None:
    def active(since: float, until: float) -> list[int]:
        return [m.active_sessions for m in fleet.activity(at(since), until=at(until))]

    assert active(0, 2) == [1, 1]  # a
    assert active(19, 28) == [2, 3, 3, 3, 3, 3, 3, 3, 2]  # c from 20, in its end minute 26
    # d's run 1 from 40 to 41, its run 2 from 42; a, b and anon throughout.
    assert active(39, 44) == [3, 4, 4, 4, 4]


def test_activity_refuses_naive_times_and_windows_beyond_a_week(store: SessionStore) -> None:
    with pytest.raises(ValueError, match="aware"):
        store.activity(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match=f"at most {MAX_ACTIVITY_MINUTES} minutes"):
        store.activity(at(0), until=at(0) + timedelta(days=8))
    assert len(store.activity(at(0), until=at(0) + timedelta(days=7))) == MAX_ACTIVITY_MINUTES


def test_top_users_refuse_an_unknown_measure_and_a_limit_out_of_bounds(store: SessionStore) -> None:
    with pytest.raises(ValueError, match="by: must be one of requests, errors, cost, p95"):
        store.top_users("latency")  # type: ignore[arg-type]
    for limit in (0, -1, 10_001):
        with pytest.raises(ValueError, match=r"^limit: must be an integer from 1 to 10000 \(got"):
            store.top_users(limit=limit)
