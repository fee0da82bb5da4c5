"""`--since` / `--until`: an ISO 8601 time or a duration ago, and a clear error otherwise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from sessions.cli import parse_moment

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        (" 0s ", timedelta(0)),
    ],
)
def test_a_duration_is_that_long_before_now(text: str, ago: timedelta) -> None:
    assert parse_moment(text, now=NOW) == NOW - ago


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2024-04-30T08:15:00Z", datetime(2024, 4, 30, 8, 15, tzinfo=UTC)),
        (
            "2024-04-30T10:15:00+02:00",
            datetime(2024, 4, 30, 10, 15, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2024-04-30T08:15:00", datetime(2024, 4, 30, 8, 15, tzinfo=UTC)),  # naive is UTC
        ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC)),
    ],
)
def test_an_iso_time_is_taken_as_it_says_and_as_utc_without_an_offset(
    text: str, moment: datetime
) -> None:
    parsed = parse_moment(text, now=NOW)
    assert parsed == moment and parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["", "3 days", "1x", "h", "2h-5m", "yesterday", "2024-13-01"])
def test_anything_else_is_refused_naming_both_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"neither an ISO 8601 time .* nor a duration ago"):
        parse_moment(text, now=NOW)


def test_a_duration_past_the_calendar_is_refused() -> None:
    with pytest.raises(ValueError, match="before the year 1"):
        parse_moment("999999999d", now=NOW)
