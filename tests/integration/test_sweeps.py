"""Sweeps: each ends what it must, returns it, and changes nothing when run again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial

import pytest

from sessions import sweeps
from sessions.bounds import MAX_COUNT, MAX_DURATION, MAX_SECONDS, REFUSED_ARGUMENTS
from sessions.events import RecordEvent
from sessions.store import SessionStore
from tests.integration.support import (
    DEADLINE,
    Worker,
    at,
    batch,
    blocked_on_lock,
    commit_gate,
    create,
    end,
    ledger_ids,
    live_rows,
    record,
    run_rows,
    snapshot,
)
from tests.support.workers_harness import wait_until

OpenStore = Callable[[SessionStore], SessionStore]


def test_expire_idle_expires_only_idle_active_sessions(store: SessionStore) -> None:
    store.apply(batch(record("idle", 0), record("busy", 0), record("busy", 25)))
    store.apply(batch(record("edge", 10), record("done", 0), end("done", 1)))
    now = at(40)  # cutoff: 30 minutes earlier, at(10)
    result = store.expire_idle(1800, now=now)
    assert result.sweep == "expire_idle"
    assert result.changed == ("idle",)
    assert result.count == 1
    idle = store.get("idle")
    assert idle is not None
    # Ended at the event-time moment it became idle-expired, not at the sweep's clock.
    assert (idle.status, idle.end_reason, idle.ended_at) == ("expired", "idle", at(30))
    assert idle.last_activity == at(0)
    assert idle.request_count == 1
    statuses = {sid: row["status"] for sid, row in live_rows(store).items()}
    assert statuses == {"idle": "expired", "busy": "active", "edge": "active", "done": "completed"}
    done = store.get("done")
    assert done is not None and done.end_reason == "explicit"


def test_a_create_sent_after_the_idle_deadline_starts_a_new_run_even_if_the_sweep_ran_first(
    store: SessionStore,
) -> None:
    """The guide's pool finds a session expired and re-creates it; the sweep wins the race."""
    store.apply(batch(record("pooled", 0)))
    assert store.expire_idle(1800, now=at(45)).changed == ("pooled",)
    # Stamped at minute 40: after the idle deadline (minute 30), before the sweep ran.
    store.apply(batch(create("pooled", 40), record("pooled", 41)))
    pooled = store.get("pooled")
    assert pooled is not None
    assert (pooled.status, pooled.run, pooled.request_count) == ("active", 2, 1)


def test_expire_idle_twice_changes_nothing_the_second_time(store: SessionStore) -> None:
    store.apply(batch(record("a", 0), record("b", 1), record("c", 30)))
    assert store.expire_idle(1800, now=at(40)).changed == ("a", "b")
    before = snapshot(store)
    assert store.expire_idle(1800, now=at(41)).changed == ()
    assert snapshot(store) == before


def test_expire_idle_uses_the_settings_default(store: SessionStore) -> None:
    assert store.settings.max_idle_seconds == 1800
    store.apply(batch(record("a", 0), record("b", 5)))
    assert store.expire_idle(now=at(31)).changed == ("a",)


def test_expire_idle_dry_run_reports_without_changing(store: SessionStore) -> None:
    store.apply(batch(record("a", 0), record("b", 30)))
    before = snapshot(store)
    assert store.expire_idle(1800, now=at(40), dry_run=True).changed == ("a",)
    assert snapshot(store) == before


def test_expire_older_than_uses_creation_not_activity(store: SessionStore) -> None:
    day = 24 * 60
    store.apply(batch(record("old", 0), record("old", 8 * day - 1)))  # busy, but 8 days old
    store.apply(batch(record("young", 2 * day), record("old-ended", 0), end("old-ended", 1)))
    now = at(8 * day)
    result = store.expire_older_than(timedelta(days=7), now=now)
    assert result.sweep == "expire_older_than"
    assert result.changed == ("old",)
    old = store.get("old")
    assert old is not None
    assert (old.status, old.end_reason) == ("expired", "age")
    assert old.ended_at == at(0) + timedelta(days=7)
    ended = store.get("old-ended")
    assert ended is not None and (ended.status, ended.end_reason) == ("completed", "explicit")
    before = snapshot(store)
    assert store.expire_older_than(timedelta(days=7), now=now).changed == ()
    assert snapshot(store) == before


def test_expire_older_than_defaults_to_seven_days(store: SessionStore) -> None:
    day = 24 * 60
    store.apply(batch(create("eight", 0), create("six", 2 * day)))
    assert store.expire_older_than(now=at(8 * day)).changed == ("eight",)


def _requests(session_id: str, total: int, errors: int) -> list[RecordEvent]:
    return [record(session_id, n, error=n < errors) for n in range(total)]


def test_sweep_health_fails_above_fail_rate_and_warns_above_warn_rate(
    store: SessionStore,
) -> None:
    events = [
        *_requests("failing", 4, 3),  # 0.75: fails
        *_requests("half", 4, 2),  # exactly 0.5: not above fail, above warn
        *_requests("warning", 5, 2),  # 0.4: warns
        *_requests("edge-warn", 10, 3),  # exactly 0.3: neither
        *_requests("healthy", 10, 1),
        *_requests("ended", 2, 2),
    ]
    store.apply(batch(*events))
    store.apply(batch(end("ended", 30)))
    result = store.sweep_health(0.3, 0.5, 1)
    assert result.sweep == "sweep_health"
    assert result.changed == ("failing",)
    assert result.warned == ("half", "warning")
    failing = store.get("failing")
    assert failing is not None
    # Ended as of the last activity the verdict saw.
    assert (failing.status, failing.end_reason, failing.ended_at) == ("failed", "health", at(3))
    for warned in result.warned:
        session = store.get(warned)
        assert session is not None and session.status == "active"
    ended = store.get("ended")
    assert ended is not None and ended.status == "completed"

    before = snapshot(store)
    again = store.sweep_health(0.3, 0.5, 1)
    assert again.changed == ()
    assert again.warned == ("half", "warning")  # still reported, never ended
    assert snapshot(store) == before


def test_sweep_health_respects_min_requests(store: SessionStore) -> None:
    store.apply(batch(*_requests("one-bad", 1, 1), *_requests("three-bad", 3, 3)))
    store.apply(batch(create("no-requests", 0)))
    result = store.sweep_health(0.3, 0.5, 3)
    assert result.changed == ("three-bad",)
    assert result.warned == ()
    one = store.get("one-bad")
    assert one is not None and one.status == "active"
    # With the guide's threshold of any request, the single failed request counts.
    assert store.sweep_health(0.3, 0.5, 1).changed == ("one-bad",)


def test_sweep_health_defaults_are_the_guides(store: SessionStore) -> None:
    store.apply(batch(*_requests("bad", 10, 6), *_requests("meh", 10, 4)))
    result = store.sweep_health()
    assert (result.changed, result.warned) == (("bad",), ("meh",))


def test_purge_removes_old_ended_data_and_old_ledger_rows(store: SessionStore) -> None:
    old_batch = batch(create("old-ended", 0), end("old-ended", 1), record("active-old", 0))
    store.apply(old_batch, now=at(0))
    store.apply(batch(create("pooled", 0), end("pooled", 2)), now=at(2))
    store.apply(batch(create("pooled", 3)), now=at(3))
    new_batch = batch(create("new-ended", 100), end("new-ended", 101))
    store.apply(new_batch, now=at(101))
    store.apply({"batch_id": "bad", "events": []}, now=at(0))  # an old dead letter
    store.apply({"batch_id": "bad", "events": []}, now=at(101))  # a recent one

    cutoff = at(50)
    result = store.purge(ended_before=cutoff, ledger_before=cutoff, dead_letters_before=cutoff)
    assert (result.sessions, result.runs, result.ledger, result.dead_letters) == (1, 1, 3, 1)
    assert sorted(live_rows(store)) == ["active-old", "new-ended", "pooled"]
    assert run_rows(store) == {}
    assert ledger_ids(store) == {new_batch.batch_id}
    assert len(store.dead_letters()) == 1

    again = store.purge(ended_before=cutoff, ledger_before=cutoff, dead_letters_before=cutoff)
    assert (again.sessions, again.runs, again.ledger, again.dead_letters) == (0, 0, 0, 0)


def test_purge_never_removes_active_sessions(store: SessionStore) -> None:
    store.apply(batch(record("ancient", 0)), now=at(0))
    result = store.purge(ended_before=at(10**6), ledger_before=at(0))
    assert (result.sessions, result.runs, result.ledger) == (0, 0, 0)
    assert store.get("ancient") is not None


def test_purge_defaults_keep_recent_data(store: SessionStore) -> None:
    old = batch(create("s", 0), end("s", 1))  # ended in 2024: older than 30 days
    store.apply(old, now=at(1))  # and its ledger row older than 14 days
    recent = batch(record("t", 0))
    store.apply(recent)  # ledger row stamped now
    result = store.purge()
    assert (result.sessions, result.ledger, result.dead_letters) == (1, 1, 0)
    assert ledger_ids(store) == {recent.batch_id}


def test_after_purge_a_run_late_record_lands_in_the_live_run(store: SessionStore) -> None:
    store.apply(batch(create("s", 0), end("s", 1)))
    store.apply(batch(create("s", 10)))
    store.purge(ended_before=at(5), ledger_before=at(0))
    assert run_rows(store) == {}
    store.apply(batch(record("s", 0.5)))  # its run is gone: counted, never dropped
    live = store.get("s")
    assert live is not None and (live.run, live.request_count) == (2, 1)


def test_sweeps_running_at_once_end_each_session_once(
    store: SessionStore, another_store: OpenStore
) -> None:
    store.apply(batch(*(record(f"s{n:02}", n % 5) for n in range(40)), record("busy", 45)))
    stores = [another_store(store) for _ in range(4)]
    workers = [Worker(partial(s.expire_idle, 1800, now=at(60))) for s in stores]
    for worker in workers:
        worker.start()
    results = [worker.outcome().changed for worker in workers]
    changed = [sid for result in results for sid in result]
    assert sorted(changed) == [f"s{n:02}" for n in range(40)]  # each exactly once
    assert store.count_active() == 1


# -- real concurrent transactions on PostgreSQL -----------------------------------------


@pytest.mark.postgres
def test_session_active_in_a_concurrent_transaction_is_not_expired(
    pg_store: SessionStore, another_store: OpenStore
) -> None:
    """The idle sweep waits for the row an apply holds, then re-checks it and skips it."""
    pg_store.apply(batch(record("busy", 0), record("idle", 0)))
    now = at(60)
    applier, sweeper = another_store(pg_store), another_store(pg_store)
    with commit_gate(applier) as gate:
        apply = Worker(lambda: applier.apply(batch(record("busy", 59))))
        apply.start()
        assert gate.reached.wait(20), "the apply never reached its commit"
        # The apply has written "busy" and holds its row lock; now the sweep runs.
        sweep = Worker(lambda: sweeper.expire_idle(1800, now=now))
        sweep.start()
        wait_until(
            blocked_on_lock(pg_store), DEADLINE, message="the sweep waits for the apply's row lock"
        )
        assert sweep.is_alive()
        gate.release()
        assert apply.outcome().applied == 1
        result = sweep.outcome()
    assert result.changed == ("idle",)
    busy = pg_store.get("busy")
    assert busy is not None
    assert (busy.status, busy.request_count, busy.last_activity) == ("active", 2, at(59))


@pytest.mark.postgres
def test_record_waiting_for_a_sweep_is_counted_in_the_expired_session(
    pg_store: SessionStore, another_store: OpenStore
) -> None:
    """The other order: the sweep ended the session first; the record still counts."""
    pg_store.apply(batch(record("s", 0)))
    applier, sweeper = another_store(pg_store), another_store(pg_store)
    with commit_gate(sweeper) as gate:
        sweep = Worker(lambda: sweeper.expire_idle(1800, now=at(60)))
        sweep.start()
        assert gate.reached.wait(20), "the sweep never reached its commit"
        apply = Worker(lambda: applier.apply(batch(record("s", 59, error=True))))
        apply.start()
        wait_until(
            blocked_on_lock(pg_store), DEADLINE, message="the apply waits for the sweep's row lock"
        )
        gate.release()
        assert sweep.outcome().changed == ("s",)
        assert apply.outcome().applied == 1
    session = pg_store.get("s")
    assert session is not None
    assert (session.status, session.end_reason) == ("expired", "idle")
    assert (session.request_count, session.error_count, session.last_activity) == (2, 1, at(59))


@pytest.mark.postgres
@pytest.mark.parametrize("sweep", ["expire_idle", "expire_older_than", "sweep_health"])
def test_a_second_sweep_waiting_on_the_first_changes_nothing(
    pg_store: SessionStore, another_store: OpenStore, sweep: str
) -> None:
    pg_store.apply(batch(*_requests("a", 2, 2), *_requests("b", 3, 3), record("c", 50)))
    now = at(24 * 60 * 8)
    calls = {
        "expire_idle": lambda s: s.expire_idle(1800, now=now),
        "expire_older_than": lambda s: s.expire_older_than(timedelta(days=7), now=now),
        "sweep_health": lambda s: s.sweep_health(0.3, 0.5, 1),
    }
    first, second = another_store(pg_store), another_store(pg_store)
    with commit_gate(first) as gate:
        one = Worker(lambda: calls[sweep](first))
        one.start()
        assert gate.reached.wait(20), "the first sweep never reached its commit"
        two = Worker(lambda: calls[sweep](second))
        two.start()
        wait_until(
            blocked_on_lock(pg_store), DEADLINE, message="the second sweep waits for the first"
        )
        gate.release()
        changed_first = one.outcome().changed
        changed_second = two.outcome().changed
    expected = ("a", "b") if sweep == "sweep_health" else ("a", "b", "c")
    assert changed_first == expected
    assert changed_second == ()


# -- bounds: a sweep refuses an argument out of the settings' bounds and changes nothing -----

#: Idle thresholds the settings refuse (SESSIONS_MAX_IDLE_SECONDS is above 0, at most 100
#: years); ``-1`` once expired every active session, the others raised from ``timedelta``.
BAD_IDLE = [-1, 0, float("nan"), float("inf"), float("-inf"), 1e300]
BAD_AGE = [timedelta(0), timedelta(seconds=-1), timedelta(days=36_526)]
BAD_HEALTH = [
    ({"warn_rate": -0.1}, "warn_rate: must be a number from 0 to 1"),
    ({"fail_rate": 1.5}, "fail_rate: must be a number from 0 to 1"),
    ({"fail_rate": float("nan")}, "fail_rate: must be a number from 0 to 1"),
    ({"warn_rate": 0.6, "fail_rate": 0.5}, "warn_rate: must not exceed fail_rate (0.5)"),
    ({"min_requests": 0}, "min_requests: must be an integer from 1 to"),
]


def _active_fleet(store: SessionStore) -> tuple[object, ...]:
    """Three active sessions, one of them erring (the health sweep's prey), and a snapshot."""
    store.apply(batch(record("a", 0), record("b", 0), *_requests("bad", 4, 4)))
    return snapshot(store)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("max_idle_seconds", BAD_IDLE)
def test_an_idle_threshold_out_of_bounds_is_refused_and_expires_nothing(
    store: SessionStore, max_idle_seconds: float, dry_run: bool
) -> None:
    before = _active_fleet(store)
    with pytest.raises(ValueError, match=r"^max_idle_seconds: must be a finite number of seconds"):
        store.expire_idle(max_idle_seconds, now=at(24 * 60), dry_run=dry_run)
    with pytest.raises(ValueError, match=r"^max_idle_seconds: must be a finite number of seconds"):
        store.get_or_create("a", max_idle_seconds=max_idle_seconds)  # the pool's idle check
    assert snapshot(store) == before and store.count_active() == 3


@pytest.mark.parametrize("max_age", BAD_AGE)
def test_an_age_out_of_bounds_is_refused_and_expires_nothing(
    store: SessionStore, max_age: timedelta
) -> None:
    before = _active_fleet(store)
    with pytest.raises(ValueError, match=r"^max_age: must be above 0 and at most 36525 days"):
        store.expire_older_than(max_age, now=at(24 * 60))
    assert snapshot(store) == before


@pytest.mark.parametrize(("thresholds", "message"), BAD_HEALTH)
def test_health_thresholds_out_of_bounds_are_refused_and_fail_nothing(
    store: SessionStore, thresholds: dict[str, float], message: str
) -> None:
    before = _active_fleet(store)
    with pytest.raises(ValueError) as caught:
        store.sweep_health(**thresholds)  # type: ignore[arg-type]
    assert str(caught.value).startswith(message)
    assert snapshot(store) == before


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (lambda s: s.expire_idle("60"), "max_idle_seconds: must be a number of seconds, not str"),
        (lambda s: s.expire_idle(True), "max_idle_seconds: must be a number of seconds, not bool"),
        (lambda s: s.expire_older_than(7), "max_age: must be a timedelta, not int"),
        (lambda s: s.sweep_health("0.3"), "warn_rate: must be a number from 0 to 1, not str"),
        (lambda s: s.sweep_health(min_requests=1.0), "min_requests: must be an integer, not float"),
        (lambda s: s.expire_idle(60, session_id=7), "session_id: must be a str, not int"),
    ],
)
def test_a_sweep_argument_of_the_wrong_type_is_a_type_error_naming_it(
    store: SessionStore, sweep: Callable[[SessionStore], object], message: str
) -> None:
    before = _active_fleet(store)
    with pytest.raises(TypeError) as caught:
        sweep(store)
    assert str(caught.value) == message
    assert snapshot(store) == before


@pytest.mark.parametrize(
    "now",
    [datetime(2024, 1, 2, 12, 0), datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))],
    ids=["naive", "year-0-utc"],
)
def test_a_sweeps_clock_out_of_bounds_is_refused(store: SessionStore, now: datetime) -> None:
    before = _active_fleet(store)
    for sweep in (
        lambda: store.expire_idle(1800, now=now),
        lambda: store.expire_older_than(timedelta(days=7), now=now),
    ):
        with pytest.raises(ValueError, match=r"^now: must be"):
            sweep()
    assert snapshot(store) == before


def test_the_sweep_statements_check_their_arguments_too(store: SessionStore) -> None:
    """sessions.sweeps' functions are public: called on a connection directly, they refuse
    what the store's methods refuse (the same checks), inside the caller's transaction."""
    before = _active_fleet(store)
    with store.engine.connect() as connection:
        with pytest.raises(ValueError, match=r"^max_idle_seconds: must be a finite number"):
            sweeps.expire_idle(connection, -1, at(24 * 60))
        with pytest.raises(ValueError, match=r"^max_age: must be above 0"):
            sweeps.expire_older_than(connection, timedelta(days=-1), at(24 * 60))
        with pytest.raises(ValueError, match=r"^warn_rate: must not exceed fail_rate"):
            sweeps.sweep_health(connection, 0.9, 0.5, 1)
        connection.rollback()
    assert snapshot(store) == before


def test_the_longest_thresholds_are_accepted(store: SessionStore) -> None:
    before = _active_fleet(store)
    assert store.expire_idle(MAX_SECONDS, now=at(24 * 60)).changed == ()
    assert store.expire_older_than(MAX_DURATION, now=at(24 * 60)).changed == ()
    assert store.sweep_health(1.0, 1.0, MAX_COUNT).changed == ()
    assert snapshot(store) == before


@pytest.mark.parametrize(
    ("task", "kwargs", "message"),
    [
        ("expire_idle", {"max_idle_seconds": -1}, "max_idle_seconds: must be a finite number"),
        ("expire_idle", {"max_idle_seconds": 1e300}, "max_idle_seconds: must be a finite number"),
        ("expire_idle", {"max_idle_seconds": "60"}, "max_idle_seconds: must be a number"),
        ("expire_older_than", {"max_age_days": -1}, "max_age_days: must be a finite number"),
        ("expire_older_than", {"max_age_days": 1e300}, "max_age_days: must be a finite number"),
        ("expire_older_than", {"max_age_days": "7"}, "max_age_days: must be a number of days"),
        ("sweep_health", {"warn_rate": 0.9, "fail_rate": 0.5}, "warn_rate: must not exceed"),
        ("sweep_health", {"min_requests": -1}, "min_requests: must be an integer from 1"),
    ],
)
def test_a_sweep_task_sent_arguments_out_of_bounds_fails_naming_them_and_changes_nothing(
    task_store: SessionStore,
    task: str,
    kwargs: dict[str, object],
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What ``celery call sessions.expire_idle --kwargs '{"max_idle_seconds": -1}'`` or a beat
    entry could send: the task fails (the caller sees the error), with one ERROR line."""
    from sessions.worker import tasks

    before = _active_fleet(task_store)
    with caplog.at_level(logging.INFO, logger="sessions.worker.tasks"):
        result = getattr(tasks, task).apply(kwargs=kwargs)
    assert result.failed()
    assert isinstance(result.result, REFUSED_ARGUMENTS)  # not a bare ValueError: it pickles
    assert str(result.result).startswith(message)
    [refused] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One line, no traceback.
    assert refused.name == "sessions.worker.tasks" and refused.exc_info is None
    assert "refused its arguments, changed nothing: " + message in refused.getMessage()
    assert snapshot(task_store) == before
