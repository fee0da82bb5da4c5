"""sessions.bounds: each check names the argument and its rule, and passes what is in bounds."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from sessions import bounds
from sessions.bounds import ArgumentError, ArgumentTypeError


@pytest.mark.parametrize(
    "value", [-1, 0, -0.0, float("nan"), float("inf"), 1e300, pytest.param(10**5000, id="10**5000")]
)
def test_a_duration_in_seconds_out_of_bounds_is_refused_naming_it(value: float) -> None:
    with pytest.raises(ArgumentError) as caught:
        bounds.check_seconds("max_idle_seconds", value)
    assert str(caught.value).startswith(
        "max_idle_seconds: must be a finite number of seconds above 0 and at most "
        "3155760000 (100 years) (got "
    )


@pytest.mark.parametrize("value", [1e-9, 1, 1800, 1800.5, bounds.MAX_SECONDS])
def test_a_duration_in_seconds_in_bounds_is_returned(value: float) -> None:
    assert bounds.check_seconds("max_idle_seconds", value) == value


def test_zero_seconds_is_accepted_only_where_said() -> None:
    assert bounds.check_seconds("max_idle_seconds", 0, zero=True) == 0
    with pytest.raises(ArgumentError, match="from 0 and at most"):
        bounds.check_seconds("max_idle_seconds", -1, zero=True)


@pytest.mark.parametrize("value", ["60", None, True, b"1", [60]])
def test_a_duration_that_is_not_a_number_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match=r"^max_idle_seconds: must be a number of seconds, not "):
        bounds.check_seconds("max_idle_seconds", value)


@pytest.mark.parametrize("value", [-1, 0, float("nan"), float("-inf"), 1e300, 36_526])
def test_a_duration_in_days_out_of_bounds_is_refused(value: float) -> None:
    with pytest.raises(ArgumentError, match=r"^max_age_days: must be a finite number of days"):
        bounds.check_days("max_age_days", value)
    assert bounds.check_days("max_age_days", bounds.MAX_DAYS) == bounds.MAX_DAYS


@pytest.mark.parametrize(
    "value", [timedelta(0), timedelta(seconds=-1), bounds.MAX_DURATION + timedelta(microseconds=1)]
)
def test_a_timedelta_out_of_bounds_is_refused(value: timedelta) -> None:
    with pytest.raises(ArgumentError, match=r"^max_age: must be above 0 and at most 36525 days"):
        bounds.check_duration("max_age", value)
    with pytest.raises(ArgumentTypeError, match=r"^max_age: must be a timedelta, not float"):
        bounds.check_duration("max_age", 7.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_a_rate_outside_0_to_1_is_refused(value: float) -> None:
    with pytest.raises(ArgumentError, match=r"^warn_rate: must be a number from 0 to 1 \(got"):
        bounds.check_rate("warn_rate", value)


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (2**63, ValueError), (1.0, TypeError)]
)
def test_a_count_is_an_integer_within_its_bounds(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^min_requests: must be an integer"):
        bounds.check_count("min_requests", value)


@pytest.mark.parametrize(
    "value",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),  # converts to a year-0 UTC time
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1))),  # year 10000
        datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
)
def test_a_moment_outside_the_bounds_is_refused_without_overflowing(value: datetime) -> None:
    with pytest.raises(ArgumentError) as caught:
        bounds.check_moment("since", value)
    assert str(caught.value) == (
        "since: must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z "
        f"(got {value.isoformat()})"
    )


def test_a_naive_moment_is_refused_and_the_bounds_themselves_are_accepted() -> None:
    with pytest.raises(ArgumentError, match=r"^until: must be timezone-aware"):
        bounds.check_moment("until", datetime(2024, 1, 1))
    assert bounds.check_moment("since", bounds.EARLIEST_MOMENT) == bounds.EARLIEST_MOMENT
    assert bounds.check_moment("until", bounds.LATEST_MOMENT) == bounds.LATEST_MOMENT


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (123, TypeError, "session_id: must be a str, not int"),
        (None, TypeError, "session_id: must be a str, not NoneType"),
        ("", ValueError, "session_id: must be 1 to 255 printable ASCII characters"),
        ("a b", ValueError, "session_id: must be 1 to 255 printable ASCII characters"),
        ("a\x00", ValueError, "session_id: must be 1 to 255 printable ASCII characters"),
        ("x" * 256, ValueError, "session_id: must be 1 to 255 printable ASCII characters"),
    ],
)
def test_an_id_follows_the_event_models_rule(
    value: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        bounds.check_id("session_id", value)
    assert str(caught.value).startswith(message)
    assert bounds.check_id("session_id", "user-456-device-789") == "user-456-device-789"


class _CaseBlindId(str):
    """An id type an application might have: equal to, and hashed as, its lowercase form."""

    def __hash__(self) -> int:
        return hash(self.lower())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()


def test_an_id_of_a_str_subclass_comes_back_a_str_and_is_not_remembered_as_itself() -> None:
    # The ids the id rule remembers are the ones the client writes on the wire: a subclass
    # that compares equal to another id must not stand in for it there.
    from sessions import plain, rules

    checked = bounds.check_id("session_id", _CaseBlindId("Chat-Blind-42"))
    assert type(checked) is str and checked == "Chat-Blind-42"
    rules.check_id(_CaseBlindId("Chat-Blind-43"))
    assert not any(type(key) is not str for key in rules.valid_ids)
    fields = plain.plain_record("chat-blind-43", 0.1, False, None, True, 0, 0, 0.0)
    assert fields is not None
    assert '"session_id":"chat-blind-43"' in plain.event_json(fields)


def test_a_choice_names_the_allowed_values() -> None:
    with pytest.raises(ArgumentError) as caught:
        bounds.check_choice("status", "bogus", ("active", "completed"))
    assert str(caught.value) == "status: must be one of active, completed (got 'bogus')"


def test_the_errors_survive_pickling_as_celery_returns_them() -> None:
    """A sweep task's caller gets the error back through Celery, which pickles it (else it
    would fall back to a bare ``ValueError``)."""
    for check in (lambda: bounds.check_rate("warn_rate", 2), lambda: bounds.check_rate("x", "1")):
        with pytest.raises(bounds.REFUSED_ARGUMENTS) as caught:
            check()
        copy = pickle.loads(pickle.dumps(caught.value))
        assert type(copy) is type(caught.value) and str(copy) == str(caught.value)
