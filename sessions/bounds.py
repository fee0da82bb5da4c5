"""What a caller may pass to the store's sweeps and reads, checked in one place.

The store, the sweep statements, ``ContextEngine``, the worker's sweep tasks and the CLI all
call these checks (the settings carry the same bounds), so a sweep started by hand, by
``celery call`` or by beat accepts exactly what ``SESSIONS_MAX_IDLE_SECONDS`` and the other
settings may be. Each check returns the value it was given; a value of the wrong type raises
:class:`ArgumentTypeError` (a ``TypeError``), one out of bounds :class:`ArgumentError` (a
``ValueError``), each naming the argument and its rule:
``max_idle_seconds: must be a finite number of seconds above 0 ... (got -1)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sessions import rules

T = TypeVar("T")

#: Longest duration a sweep or a setting takes (100 years): far beyond any real threshold, and
#: short enough that ``now - duration`` is a time Python and both databases can hold.
MAX_DAYS = 36_525
MAX_SECONDS = MAX_DAYS * 86_400
MAX_DURATION = timedelta(days=MAX_DAYS)
#: The earliest and the latest moment a read's window (``since``, ``until``, a sweep's
#: ``now``) takes. Nothing the store holds can be older than the Unix epoch, and the latest
#: is the last second every backend and ``datetime`` can convert to UTC.
EARLIEST_MOMENT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_MOMENT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
#: Most rows one read returns at once (``list``'s page, ``top_users``, ``unhealthy``).
MAX_PAGE_SIZE = 10_000
#: Largest count a threshold takes: the largest value of the BIGINT counters it is compared with.
MAX_COUNT = 2**63 - 1


class ArgumentError(ValueError):
    """An argument outside its bounds: ``name: rule (got value)``.

    Made by :meth:`of`; the plain one-message constructor is what ``pickle`` and Celery's
    result serialization call, so a sweep task's caller gets this class back, not a bare
    ``ValueError``.
    """

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        #: What is wrong without the argument's name, e.g. for the CLI to name its option.
        self.problem = problem or message

    @classmethod
    def of(cls, name: str, rule: str, value: object) -> ArgumentError:
        problem = f"{rule} (got {_shown(value)})"
        return cls(f"{name}: {problem}", problem)


def _shown(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        return repr(value)
    except ValueError:  # an int too long to print (sys.set_int_max_str_digits)
        assert isinstance(value, int)
        return f"an integer of {value.bit_length()} bits"


class ArgumentTypeError(TypeError):
    """An argument of the wrong type: ``name: must be ..., not type`` (made by :meth:`of`)."""

    @classmethod
    def of(cls, name: str, what: str, value: object) -> ArgumentTypeError:
        return cls(f"{name}: must be {what}, not {type(value).__name__}")


#: What the checks raise, for a caller that reports refused arguments (and nothing else).
REFUSED_ARGUMENTS = (ArgumentError, ArgumentTypeError)


def _number(name: str, value: object, what: str) -> float:
    """``value`` if it is a real number (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentTypeError.of(name, what, value)
    return value


def _finite(value: float) -> bool:
    # An int is finite, however large (``math.isfinite`` would overflow converting it).
    return isinstance(value, int) or math.isfinite(value)


def check_seconds(name: str, value: float, *, zero: bool = False) -> float:
    """A duration in seconds: above 0 (from 0 with ``zero``) and at most :data:`MAX_SECONDS`."""
    seconds = _number(name, value, "a number of seconds")
    above_low = seconds >= 0 if zero else seconds > 0
    if not (_finite(seconds) and above_low and seconds <= MAX_SECONDS):
        low = "from 0" if zero else "above 0"
        rule = f"must be a finite number of seconds {low} and at most {MAX_SECONDS} (100 years)"
        raise ArgumentError.of(name, rule, value)
    return value


def check_days(name: str, value: float) -> float:
    """A duration in days: above 0 and at most :data:`MAX_DAYS` (``timedelta(days=value)``
    exists)."""
    days = _number(name, value, "a number of days")
    if not (_finite(days) and 0 < days <= MAX_DAYS):
        rule = f"must be a finite number of days above 0 and at most {MAX_DAYS} (100 years)"
        raise ArgumentError.of(name, rule, value)
    return value


def check_hours(name: str, value: float) -> float:
    """A duration in hours: above 0 and at most :data:`MAX_DAYS` days (100 years)."""
    hours = _number(name, value, "a number of hours")
    if not (_finite(hours) and 0 < hours <= MAX_DAYS * 24):
        rule = f"must be a finite number of hours above 0 and at most {MAX_DAYS * 24} (100 years)"
        raise ArgumentError.of(name, rule, value)
    return value


def check_duration(name: str, value: timedelta) -> timedelta:
    """A ``timedelta`` above 0 to :data:`MAX_DURATION`."""
    if not isinstance(value, timedelta):
        raise ArgumentTypeError.of(name, "a timedelta", value)
    if not timedelta(0) < value <= MAX_DURATION:
        raise ArgumentError.of(name, f"must be above 0 and at most {MAX_DAYS} days", value)
    return value


def check_rate(name: str, value: float) -> float:
    """An error rate: a number from 0 to 1."""
    rate = _number(name, value, "a number from 0 to 1")
    if not (_finite(rate) and 0 <= rate <= 1):
        raise ArgumentError.of(name, "must be a number from 0 to 1", value)
    return value


def check_count(name: str, value: int, low: int = 1, high: int = MAX_COUNT) -> int:
    """An integer from ``low`` to ``high`` (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError.of(name, "an integer", value)
    if not low <= value <= high:
        raise ArgumentError.of(name, f"must be an integer from {low} to {high}", value)
    return value


def check_limit(name: str, value: int) -> int:
    """How many rows a read returns: 1 to :data:`MAX_PAGE_SIZE`."""
    return check_count(name, value, 1, MAX_PAGE_SIZE)


def check_moment(name: str, value: datetime) -> datetime:
    """A timezone-aware moment from :data:`EARLIEST_MOMENT` to :data:`LATEST_MOMENT`."""
    if not isinstance(value, datetime):
        raise ArgumentTypeError.of(name, "a datetime", value)
    if value.utcoffset() is None:
        raise ArgumentError.of(name, "must be timezone-aware (UTC, say)", value)
    if not EARLIEST_MOMENT <= value <= LATEST_MOMENT:
        raise ArgumentError.of(
            name, f"must be from {_iso(EARLIEST_MOMENT)} to {_iso(LATEST_MOMENT)}", value
        )
    return value


def _iso(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


def check_id(name: str, value: str) -> str:
    """A session or user id, by the event model's rule (a read of any other finds nothing
    that could exist, and one with a NUL character PostgreSQL cannot even compare)."""
    if not isinstance(value, str):
        raise ArgumentTypeError.of(name, "a str", value)
    try:
        return rules.check_id(str.__str__(value))  # a str itself, as the model's validation gave
    except ValueError as exc:
        raise ArgumentError.of(name, str(exc), value) from None


def check_choice(name: str, value: T, allowed: Collection[T]) -> T:
    """One of ``allowed`` (a status, a ranking)."""
    if value not in allowed:
        raise ArgumentError.of(name, f"must be one of {', '.join(map(str, allowed))}", value)
    return value
