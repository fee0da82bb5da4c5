"""Every apply rule of issue 3, each on its own, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

import pytest

from sessions import decoding
from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent
from sessions.plain import batch_json, plain_record, record_event
from sessions.records import ApplyResult
from sessions.store import SessionStore
from tests.integration.support import (
    Worker,
    at,
    batch,
    create,
    end,
    latency_rows,
    ledger_ids,
    live_rows,
    record,
    reset,
    run_rows,
    snapshot,
)

Event = CreateEvent | RecordEvent | EndEvent


def test_record_for_an_unknown_session_creates_it_active(store: SessionStore) -> None:
    result = store.apply(
        batch(
            record("user-123", 1, processing_time=0.5, user_id="user-456", input_tokens=7),
            record("user-123", 3, processing_time=1.25, error=True, output_tokens=2, cost=0.5),
        )
    )
    assert result == ApplyResult(applied=2, claimed=True, oldest_event_at=at(1))
    session = store.get("user-123")
    assert session is not None
    assert (session.status, session.end_reason, session.run) == ("active", None, 1)
    assert session.user_id == "user-456"
    assert session.created_at == at(1)
    assert session.last_activity == at(3)
    assert session.ended_at is None
    assert (session.request_count, session.error_count) == (2, 1)
    assert session.total_processing_time == 1.75
    assert (session.input_tokens, session.output_tokens, session.cost) == (7, 2, 0.5)
    assert run_rows(store) == {}


def test_record_without_a_request_adds_time_and_errors_only(store: SessionStore) -> None:
    store.apply(batch(record("s", 1, processing_time=1.0)))
    store.apply(
        batch(
            record("s", 2, processing_time=0.25, error=True).model_copy(
                update={"counts_request": False}
            )
        )
    )
    session = store.get("s")
    assert session is not None
    assert (session.request_count, session.error_count) == (1, 1)
    assert session.total_processing_time == 1.25


def test_last_activity_is_the_latest_event_time_not_arrival(store: SessionStore) -> None:
    store.apply(batch(record("s", 10)))
    store.apply(batch(record("s", 4)))  # a backlog delivers an older event later
    session = store.get("s")
    assert session is not None
    assert session.last_activity == at(10)
    assert session.request_count == 2
    # In the first run an older event moves the start back: the session was seen earlier.
    assert session.created_at == at(4)


def test_create_for_a_new_session_sets_owner_and_metadata(store: SessionStore) -> None:
    store.apply(batch(create("user-123", 0, user_id="user-456", metadata={"source": "web"})))
    session = store.get("user-123")
    assert session is not None
    assert (session.status, session.user_id, session.metadata) == (
        "active",
        "user-456",
        {"source": "web"},
    )
    assert session.created_at == session.last_activity == at(0)
    assert session.request_count == 0


def test_create_for_an_existing_session_changes_no_counter(store: SessionStore) -> None:
    store.apply(batch(record("s", 1, processing_time=2.0, error=True, input_tokens=5, cost=1.0)))
    before = live_rows(store)["s"]
    store.apply(batch(create("s", 2, user_id="user-9", metadata={"a": 1})))
    after = live_rows(store)["s"]
    counters = (
        "request_count",
        "error_count",
        "total_processing_time",
        "input_tokens",
        "output_tokens",
        "cost",
    )
    assert {k: after[k] for k in counters} == {k: before[k] for k in counters}
    assert (after["status"], after["run"], after["created_at"]) == ("active", 1, at(1))
    # It is activity, and it fills what the auto-created session lacked.
    assert after["last_activity"] == at(2)
    assert (after["user_id"], after["metadata"]) == ("user-9", {"a": 1})
    assert run_rows(store) == {}


def test_create_never_overwrites_owner_or_metadata(store: SessionStore) -> None:
    store.apply(batch(create("s", 0, user_id="first", metadata={"v": 1})))
    store.apply(batch(create("s", 1, user_id="second", metadata={"v": 2})))
    session = store.get("s")
    assert session is not None
    assert (session.user_id, session.metadata) == ("first", {"v": 1})


def test_empty_metadata_is_kept_however_creates_are_batched(store: SessionStore) -> None:
    """The first create's metadata fills the gap, even ``{}``, in one batch or in two."""
    store.apply(batch(record("one", 0), record("two", 0)))
    store.apply(batch(create("one", 1, metadata={}), create("one", 2, metadata=None)))
    store.apply(batch(create("two", 1, metadata={})))
    store.apply(batch(create("two", 2, metadata=None)))
    one, two = store.get("one"), store.get("two")
    assert one is not None and two is not None
    assert one.metadata == two.metadata == {}


def test_end_moves_an_active_session_to_its_end_state(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), record("s", 1)))
    store.apply(batch(end("s", 5, "failed")))
    session = store.get("s")
    assert session is not None
    assert (session.status, session.end_reason) == ("failed", "explicit")
    assert session.ended_at == at(5)
    assert session.last_activity == at(5)
    assert session.request_count == 1


def test_the_first_end_wins(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), end("s", 5, "completed")))
    store.apply(batch(end("s", 6, "failed")))
    store.apply(batch(end("s", 3, "expired")))
    session = store.get("s")
    assert session is not None
    assert (session.status, session.end_reason, session.ended_at) == (
        "completed",
        "explicit",
        at(5),
    )
    assert run_rows(store) == {}


def test_a_second_end_changes_no_status_but_is_activity(store: SessionStore) -> None:
    """Whichever of two ends arrives first, the session saw activity until the later one."""
    store.apply(batch(record("a", 0), end("a", 5)))
    store.apply(batch(end("a", 6, "failed")))
    store.apply(batch(end("b", 6, "failed")))
    store.apply(batch(record("b", 0), end("b", 5)))
    a, b = store.get("a"), store.get("b")
    assert a is not None and b is not None
    assert (a.status, a.ended_at, a.last_activity) == ("completed", at(5), at(6))
    assert (b.status, b.ended_at, b.last_activity) == ("failed", at(6), at(6))
    assert a.request_count == b.request_count == 1


def test_end_in_one_batch_with_records_before_and_after(store: SessionStore) -> None:
    store.apply(batch(record("s", 0), end("s", 1), record("s", 2, error=True)))
    session = store.get("s")
    assert session is not None
    assert (session.status, session.ended_at) == ("completed", at(1))
    assert (session.request_count, session.error_count, session.last_activity) == (2, 1, at(2))


def test_record_after_the_end_is_counted_but_never_reopens(store: SessionStore) -> None:
    store.apply(batch(record("s", 0), end("s", 1)))
    store.apply(batch(record("s", 2, processing_time=1.5, error=True)))
    session = store.get("s")
    assert session is not None
    assert (session.status, session.ended_at) == ("completed", at(1))
    assert (session.request_count, session.error_count) == (2, 1)
    assert session.total_processing_time == 2.0
    assert session.last_activity == at(2)
    assert store.count_active() == 0


def test_end_for_an_unknown_session_creates_it_ended(store: SessionStore) -> None:
    store.apply(batch(end("ghost", 3, "expired")))
    session = store.get("ghost")
    assert session is not None
    assert (session.status, session.end_reason, session.run) == ("expired", "explicit", 1)
    assert session.created_at == session.last_activity == session.ended_at == at(3)
    assert (session.request_count, session.error_count) == (0, 0)


def test_create_for_an_ended_session_begins_a_new_run(store: SessionStore) -> None:
    store.apply(
        batch(
            create("user-1", 0, user_id="u", metadata={"n": 1}),
            record("user-1", 1, processing_time=2.0, error=True, input_tokens=3, cost=0.25),
            record("user-1", 2, processing_time=1.0),
        )
    )
    store.expire_idle(60, now=at(10))
    store.apply(batch(create("user-1", 20, metadata={"n": 2})))

    runs = run_rows(store)
    assert set(runs) == {("user-1", 1)}
    old = runs[("user-1", 1)]
    # Idle-expired as of last activity + 60 s, the moment the idle rule was broken.
    assert (old["status"], old["end_reason"], old["ended_at"]) == ("expired", "idle", at(3))
    assert (old["request_count"], old["error_count"], old["total_processing_time"]) == (2, 1, 3.0)
    assert (old["input_tokens"], old["cost"], old["metadata"]) == (3, 0.25, {"n": 1})
    assert (old["created_at"], old["last_activity"]) == (at(0), at(2))

    live = store.get("user-1")
    assert live is not None
    assert (live.run, live.status, live.end_reason, live.ended_at) == (2, "active", None, None)
    assert live.created_at == live.last_activity == at(20)
    assert (live.request_count, live.error_count, live.total_processing_time) == (0, 0, 0.0)
    assert (live.input_tokens, live.output_tokens, live.cost) == (0, 0, 0.0)
    assert (live.user_id, live.metadata) == ("u", {"n": 2})

    store.apply(batch(record("user-1", 21)))
    live = store.get("user-1")
    assert live is not None and live.request_count == 1
    assert run_rows(store)[("user-1", 1)]["request_count"] == 2


def test_third_run_archives_the_second(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), record("s", 1), end("s", 2)))
    store.apply(batch(create("s", 3), record("s", 4), record("s", 5), end("s", 6, "failed")))
    store.apply(batch(create("s", 7)))
    runs = run_rows(store)
    assert sorted(runs) == [("s", 1), ("s", 2)]
    assert [runs[("s", n)]["request_count"] for n in (1, 2)] == [1, 2]
    assert runs[("s", 2)]["status"] == "failed"
    live = store.get("s")
    assert live is not None and (live.run, live.status, live.request_count) == (3, "active", 0)


def test_create_older_than_the_end_does_not_restart(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), record("s", 1), end("s", 5)))
    store.apply(batch(create("s", 3)))  # late: it happened before the end
    session = store.get("s")
    assert session is not None
    assert (session.run, session.status, session.request_count) == (1, "completed", 1)
    assert run_rows(store) == {}


def test_a_runs_own_create_applied_after_its_end_still_names_owner_and_metadata(
    store: SessionStore,
) -> None:
    """One session's batches applied out of order by two workers: the create comes last."""
    store.apply(batch(record("s", 2), end("s", 3)))
    store.apply(batch(create("s", 0, user_id="u", metadata={"m": 1}), record("s", 1)))
    session = store.get("s")
    assert session is not None
    assert (session.run, session.status, session.request_count) == (1, "completed", 2)
    assert (session.user_id, session.metadata, session.created_at) == ("u", {"m": 1}, at(0))
    assert run_rows(store) == {}


def test_event_older_than_the_live_run_goes_to_the_earlier_run(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), record("s", 1), end("s", 5)))
    store.apply(batch(create("s", 10), record("s", 11)))
    # Late events of the first run: a record counts there, an end cannot end run 2.
    late = store.apply(
        batch(record("s", 4, processing_time=3.0, error=True, cost=1.5), end("s", 6, "failed"))
    )
    assert late == ApplyResult(applied=2, claimed=True, oldest_event_at=at(4))
    first = run_rows(store)[("s", 1)]
    assert (first["request_count"], first["error_count"]) == (2, 1)
    assert (first["total_processing_time"], first["cost"]) == (3.5, 1.5)
    assert first["last_activity"] == at(5)
    assert first["status"] == "completed"
    live = store.get("s")
    assert live is not None
    assert (live.run, live.status, live.request_count, live.last_activity) == (
        2,
        "active",
        1,
        at(11),
    )


def test_old_record_goes_to_the_run_live_at_its_time(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), end("s", 1)))
    store.apply(batch(create("s", 10), end("s", 11)))
    store.apply(batch(create("s", 20)))
    store.apply(batch(record("s", 12), record("s", 0.5), record("s", 10.5), record("s", 25)))
    runs = run_rows(store)
    assert runs[("s", 1)]["request_count"] == 1
    assert runs[("s", 2)]["request_count"] == 2
    assert runs[("s", 2)]["last_activity"] == at(12)
    live = store.get("s")
    assert live is not None and (live.run, live.request_count) == (3, 1)


def test_records_only_batch_splits_into_written_and_earlier_run_sessions(
    store: SessionStore,
) -> None:
    """The fast path writes "t" and "u" and leaves "s" (older than its live run) alone."""
    store.apply(batch(create("s", 0), end("s", 5)))
    store.apply(batch(create("s", 10), record("s", 11)))
    store.apply(batch(record("u", 1)))
    result = store.apply(
        batch(record("t", 4), record("s", 4, processing_time=2.0), record("u", 3), record("s", 12))
    )
    assert result == ApplyResult(applied=4, claimed=True, oldest_event_at=at(3))
    assert run_rows(store)[("s", 1)]["request_count"] == 1
    assert run_rows(store)[("s", 1)]["total_processing_time"] == 2.0
    live = {s.session_id: s for s in store.list_sessions()}
    assert (live["s"].run, live["s"].request_count, live["s"].last_activity) == (2, 2, at(12))
    assert (live["t"].request_count, live["u"].request_count) == (1, 2)
    assert (live["u"].created_at, live["u"].last_activity) == (at(1), at(3))


def test_a_record_at_its_later_runs_start_is_written_once_beside_one_left_alone(
    store: SessionStore,
) -> None:
    """Session "s" records exactly when its run 2 began: the fast path writes it (the run
    holds that time); "u" records before its run 2 and is left alone for the slow path. Only
    with a session left alone does the store look for which: "s" must not be among them."""
    for session_id in ("s", "u"):
        store.apply(batch(create(session_id, 0), end(session_id, 5)))
        store.apply(batch(create(session_id, 20)))
    store.apply(batch(record("s", 20, processing_time=1.0), record("u", 3, processing_time=1.0)))
    live = {s.session_id: s for s in store.list_sessions()}
    assert (live["s"].run, live["s"].request_count) == (2, 1)
    assert (live["u"].run, live["u"].request_count) == (2, 0)
    runs = run_rows(store)
    assert runs[("s", 1)]["request_count"] == 0
    assert runs[("u", 1)]["request_count"] == 1
    histograms = latency_rows(store)
    assert sum(n for (session, run, _), n in histograms.items() if (session, run) == ("s", 2)) == 1
    assert sum(n for (session, run, _), n in histograms.items() if (session, run) == ("u", 1)) == 1


def test_redelivered_batch_is_a_duplicate_and_changes_nothing(store: SessionStore) -> None:
    first = batch(create("s", 0, user_id="u"), record("s", 1), record("t", 2), end("s", 3))
    assert store.apply(first) == ApplyResult(applied=4, claimed=True, oldest_event_at=at(0))
    before = snapshot(store)
    assert store.apply(first) == ApplyResult(duplicate=4)
    assert store.apply(first.to_message()) == ApplyResult(duplicate=4)
    assert snapshot(store) == before
    assert ledger_ids(store) == {first.batch_id}


def test_same_events_under_a_new_batch_id_are_new(store: SessionStore) -> None:
    events = (record("s", 1), record("s", 2))
    store.apply(Batch(events=events))
    store.apply(Batch(events=events))
    session = store.get("s")
    assert session is not None and session.request_count == 4


def test_one_bad_event_is_dead_lettered_and_the_others_applied(store: SessionStore) -> None:
    good = batch(record("a", 1), record("b", 2), record("a", 3))
    message = good.to_message()
    bad = {**message["events"][1], "processing_time": -5}
    message["events"].insert(1, bad)
    result = store.apply(message)
    assert result == ApplyResult(
        applied=3,
        rejected=1,
        claimed=True,
        rejected_by_reason={"invalid_event": 1},
        oldest_event_at=at(1),
    )
    a, b = store.get("a"), store.get("b")
    assert a is not None and a.request_count == 2
    assert b is not None and b.request_count == 1
    letters = store.dead_letters()
    assert len(letters) == 1
    assert letters[0].batch_id == str(good.batch_id)
    assert letters[0].reason.startswith("events[1]: record.processing_time: must be a finite")
    assert '"processing_time": -5' in letters[0].payload
    # Redelivered, the batch changes nothing: not even another dead letter.
    assert store.apply(message) == ApplyResult(duplicate=4)
    assert len(store.dead_letters()) == 1


def test_bad_envelope_is_dead_lettered_whole_and_nothing_applied(store: SessionStore) -> None:
    payload = {"batch_id": "nope", "events": [record("s", 1).model_dump(mode="json")]}
    assert store.apply(payload) == ApplyResult(
        rejected=1, rejected_by_reason={"malformed_batch": 1}
    )
    assert store.get("s") is None
    assert ledger_ids(store) == set()
    [letter] = store.dead_letters()
    assert (letter.batch_id, letter.reason) == (None, "batch_id: must be a UUID")


def test_oversized_batch_is_dead_lettered_whole(store: SessionStore) -> None:
    limit = store.settings.store_max_batch_events
    payload = {
        "batch_id": str(uuid.uuid4()),
        "events": [record("s", 1).model_dump(mode="json")] * (limit + 1),
    }
    assert store.apply(payload) == ApplyResult(
        rejected=1, rejected_by_reason={"malformed_batch": 1}
    )
    assert store.get("s") is None
    [letter] = store.dead_letters()
    assert letter.reason == f"events: at most {limit} events per batch (got {limit + 1})"
    assert letter.payload.endswith(" bytes]") and "[cut at 65536 of " in letter.payload


def test_one_batch_touches_many_sessions_at_once(store: SessionStore) -> None:
    events = [record(f"user-{n % 7}", n, processing_time=0.25) for n in range(70)]
    result = store.apply(Batch(events=tuple(events)))
    assert result == ApplyResult(applied=70, claimed=True, oldest_event_at=at(0))
    rows = live_rows(store)
    assert sorted(rows) == [f"user-{n}" for n in range(7)]
    assert all(row["request_count"] == 10 for row in rows.values())
    assert all(row["total_processing_time"] == 2.5 for row in rows.values())
    assert rows["user-3"]["created_at"] == at(3)
    assert rows["user-3"]["last_activity"] == at(66)


def test_aware_times_come_back_in_utc(store: SessionStore) -> None:
    local = datetime(2024, 1, 1, 16, 0, tzinfo=timezone(timedelta(hours=2)))
    store.apply(batch(record("s", when=local)))
    session = store.get("s")
    assert session is not None
    assert session.created_at == datetime(2024, 1, 1, 14, 0, tzinfo=UTC)
    assert session.created_at.utcoffset() == timedelta(0)


def test_concurrent_applies_add_up_exactly(store: SessionStore) -> None:
    threads, batches, per_batch = 4, 25, 8
    plans = [
        [
            Batch(
                events=tuple(
                    record(
                        f"s{(t + b + i) % 3}",
                        b,
                        processing_time=0.125,
                        error=i % 4 == 0,
                        input_tokens=2,
                        cost=0.0625,
                    )
                    for i in range(per_batch)
                )
            )
            for b in range(batches)
        ]
        for t in range(threads)
    ]

    def work(plan: list[Batch]) -> int:
        applied = 0
        for item in plan:
            applied += store.apply(item).applied
            store.apply(item)  # every batch redelivered at once
        return applied

    workers = [Worker(partial(work, plan)) for plan in plans]
    for worker in workers:
        worker.start()
    assert sum(worker.outcome() for worker in workers) == threads * batches * per_batch
    total = threads * batches * per_batch
    aggregate = store.aggregate()
    assert aggregate.sessions == 3
    assert aggregate.request_count == total
    assert aggregate.error_count == total // 4
    assert aggregate.total_processing_time == total * 0.125
    assert aggregate.input_tokens == 2 * total
    assert aggregate.cost == total * 0.0625
    assert len(ledger_ids(store)) == threads * batches


@pytest.mark.parametrize("kind", ["record", "create", "end"])
def test_apply_does_not_read_the_wall_clock_for_event_time(store: SessionStore, kind: str) -> None:
    when = datetime.now(UTC) - timedelta(days=3)
    makers: dict[str, Callable[..., Event]] = {"record": record, "create": create, "end": end}
    event = makers[kind]("s", when=when)
    store.apply(batch(event))
    session = store.get("s")
    assert session is not None
    assert session.created_at == session.last_activity == when


def test_the_indexed_minute_and_error_rate_bound_follow_each_apply(store: SessionStore) -> None:
    """The idle sweep's minute is the activity's, rounded down; the health sweep's bound sits
    a step or two above the error rate, and moves only when the rate leaves its band."""
    second = timedelta(seconds=1)
    store.apply(batch(record("s", 1, error=True), record("s", 2)))  # 1 of 2 requests failed
    first = live_rows(store)["s"]
    assert (first["last_activity_minute"], first["error_rate_bound"]) == (at(2), 16 * 1 // 2 + 2)
    late = at(2) + 59 * second
    store.apply(batch(record("s", when=late), record("s", when=late, error=True)))
    kept = live_rows(store)["s"]  # 2 of 4: 16 r = 8, within [10 - 3, 10]
    assert (kept["last_activity_minute"], kept["error_rate_bound"]) == (at(2), 10)
    store.apply(batch(*(record("s", 3) for _ in range(7))))
    moved = live_rows(store)["s"]  # 2 of 11: 16 r = 2.9, below 7
    assert (moved["last_activity_minute"], moved["error_rate_bound"]) == (at(3), 32 // 11 + 2)
    store.apply(batch(*(record("s", 4, error=True) for _ in range(30))))
    risen = live_rows(store)["s"]  # 32 of 41: 16 r = 12.5, above 4
    assert risen["error_rate_bound"] == 16 * 32 // 41 + 2
    assert store.sweep_health(dry_run=True).changed == ("s",)


def test_an_update_of_a_live_row_writes_no_index_entry(pg_store: SessionStore) -> None:
    """The per-event update changes no indexed column (PostgreSQL updates the row in place,
    a HOT update) unless a minute or the error rate's band is left."""
    store = pg_store  # fillfactor and HOT updates are PostgreSQL's
    from sessions.apply import apply_events

    ids = [f"s-{n}" for n in range(10)]
    with store.engine.begin() as connection:  # one transaction: its own statistics
        apply_events(connection, [record(s, 1, error=s == "s-0") for s in ids])
        for repeat in range(1, 4):
            later = at(1) + timedelta(seconds=repeat)  # the same minute
            apply_events(connection, [record(s, when=later) for s in ids])
        updated, hot = connection.exec_driver_sql(
            "SELECT pg_stat_get_xact_tuples_updated('sessions'::regclass),"
            " pg_stat_get_xact_tuples_hot_updated('sessions'::regclass)"
        ).one()
    # Three updates of each of 10 rows. Only s-0 has an error: as its rate falls from 1 to
    # 1/2, 1/3, 1/4 its bound goes 18, 10, 7, 7 (two index writes); every other update is HOT.
    assert (updated, hot) == (30, 28)


def test_a_trackers_batch_of_records_is_applied_without_the_models(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's usual batch, plain records in the tracker's text, is read by
    ``sessions.wire_records``: the models, which would cost each pool process memory it keeps
    (README, Performance, item 10), are not asked; its sums are the models' all the same."""

    def no_models(payload: object, max_events: int) -> None:
        raise AssertionError("a tracker's batch of records was decoded with the models")

    fields = [
        plain_record("agent-1", 0.25, True, "user-1", True, 3, 4, 0.5),
        plain_record("agent-1", 0.5, False, None, True, 0, 0, 0.0),
        plain_record("agent-2", 1.0, False, None, False, 1, 2, 0.25),
    ]
    assert all(item is not None for item in fields)
    text = batch_json(uuid.uuid4(), fields)  # type: ignore[arg-type]
    monkeypatch.setattr(decoding, "decode_batch", no_models)
    assert store.apply(text).applied == 3
    assert store.apply(text).duplicate == 3  # the redelivery, read the same way
    monkeypatch.undo()
    rows = live_rows(store)
    assert {k: rows["agent-1"][k] for k in ("request_count", "error_count", "input_tokens")} == {
        "request_count": 2,
        "error_count": 1,
        "input_tokens": 3,
    }
    assert rows["agent-1"]["user_id"] == "user-1" and rows["agent-1"]["cost"] == 0.5
    assert rows["agent-2"]["request_count"] == 0 and rows["agent-2"]["total_processing_time"] == 1.0
    # The same events as models, applied to the emptied store, make the same rows.
    as_models = Batch(batch_id=uuid.uuid4(), events=tuple(record_event(f) for f in fields))  # type: ignore[arg-type]
    reset(store)
    assert store.apply(as_models).applied == 3
    assert live_rows(store) == rows
