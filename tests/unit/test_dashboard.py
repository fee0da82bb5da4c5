"""The dashboard's pure parts: query-parameter rules, chart geometry, serving rules."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from sessions.dashboard.app import format_ms
from sessions.dashboard.chart import HEIGHT, chart, minutes_between, nice_ceiling
from sessions.dashboard.params import (
    BadParameter,
    OverviewParams,
    SessionListParams,
    SessionParams,
    parse_query,
)
from sessions.dashboard.server import DashboardConfigError, RedactToken, is_loopback, serve
from sessions.settings import Settings

NOW = datetime(2024, 1, 1, 12, 30, 15, tzinfo=UTC)
DIGITS_ONLY = "input should be a valid integer in the digits 0-9"


def test_defaults_when_no_parameter_is_given() -> None:
    assert parse_query(OverviewParams, []) == OverviewParams(
        minutes=60, top=10, by="requests", unhealthy=20
    )


def test_values_are_converted_and_checked() -> None:
    params = parse_query(SessionListParams, [("user", "user-456-device-789"), ("limit", "5")])
    assert (params.user, params.limit, params.status) == ("user-456-device-789", 5, None)


def test_empty_form_fields_mean_any_but_unknown_empty_ones_are_refused() -> None:
    assert parse_query(SessionListParams, [("user", ""), ("status", "")]) == SessionListParams()
    with pytest.raises(BadParameter, match="query parameter 'usr': unknown parameter"):
        parse_query(SessionListParams, [("usr", "")])


def test_the_token_parameter_belongs_to_the_gate_not_the_page() -> None:
    assert parse_query(SessionParams, [("id", "s"), ("token", "x")]) == SessionParams(id="s")


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("top", "101")], "query parameter 'top': input should be less than or equal to 100"),
        ([("by", "p99")], "query parameter 'by': input should be 'requests', 'errors', 'cost'"),
        ([("minutes", "1.5")], "query parameter 'minutes': input should be a valid integer"),
        ([("top", "1"), ("top", "1")], "query parameter 'top': given more than once"),
        ([("", "1")], "query parameter '' (no name): unknown parameter"),
        ([("", "")], "query parameter '' (no name): unknown parameter"),
        # Python's int() reads all of these as a number; a query parameter is digits only.
        *(
            ([("top", text)], f"query parameter 'top': {DIGITS_ONLY} (got {text!r})")
            for text in ("1_0", " 10", "10 ", "+10", "10.0", "10\n", "-1", "\u0661\u0660")
        ),
        ([("top", "9" * 30)], "query parameter 'top': input should have at most 18 digits"),
    ],
)
def test_overview_rules(items: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(BadParameter) as raised:
        parse_query(OverviewParams, items)
    assert str(raised.value).startswith(message)


def test_numbers_may_have_leading_zeros() -> None:
    assert parse_query(OverviewParams, [("top", "010"), ("minutes", "0" * 40 + "5")]) == (
        OverviewParams(top=10, minutes=5)
    )


def test_long_values_are_cut_in_the_message() -> None:
    with pytest.raises(BadParameter) as raised:
        parse_query(SessionParams, [("id", "x" * 300)])
    assert "'" + "x" * 40 + "...'" in str(raised.value)
    assert "x" * 41 not in str(raised.value)


def test_minutes_cover_the_window_whole() -> None:
    minutes = minutes_between(NOW - timedelta(minutes=59), NOW)
    assert len(minutes) == 60
    assert minutes[0] == datetime(2024, 1, 1, 11, 31, tzinfo=UTC)
    assert minutes[-1] == datetime(2024, 1, 1, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [(0, 1), (1, 1), (2, 2), (3, 5), (7, 10), (10, 10), (11, 20), (4999, 5000)],
)
def test_nice_ceiling(value: int, ceiling: int) -> None:
    assert nice_ceiling(value) == ceiling


def test_bars_scale_to_the_peak_and_missing_minutes_are_zero() -> None:
    minutes = minutes_between(NOW - timedelta(minutes=9), NOW)
    drawn = chart("events", "bars", minutes, {minutes[2]: 5, minutes[9]: 10})
    assert (drawn.total, drawn.peak, drawn.last) == (15, 10, 10)
    assert [bar.label for bar in drawn.bars] == ["12:23 UTC: 5", "12:30 UTC: 10"]
    full, half = drawn.bars[1], drawn.bars[0]
    assert full.height == pytest.approx(2 * half.height)
    assert full.y + full.height == pytest.approx(drawn.bottom)
    assert full.y == pytest.approx(drawn.top)
    assert all(a.x + a.width <= b.x for a, b in zip(drawn.bars, drawn.bars[1:], strict=False))
    assert [tick.label for tick in drawn.y_ticks] == ["0", "5", "10"]


def test_a_line_has_one_point_per_minute_and_stays_in_the_drawing() -> None:
    minutes = minutes_between(NOW - timedelta(minutes=59), NOW)
    drawn = chart("active", "line", minutes, {m: n % 7 for n, m in enumerate(minutes)})
    points = [tuple(map(float, p.split(","))) for p in drawn.points.split()]
    assert len(points) == 60
    assert all(drawn.left <= x <= drawn.right and 0 <= y <= HEIGHT for x, y in points)
    assert [x for x, _ in points] == sorted(x for x, _ in points)
    assert len(drawn.x_ticks) == 6


def test_an_empty_chart_draws_an_axis_of_one() -> None:
    drawn = chart("events", "bars", minutes_between(NOW, NOW), {})
    assert (drawn.bars, drawn.total, drawn.peak) == ((), 0, 0)
    assert [tick.label for tick in drawn.y_ticks] == ["0", "1"]


def test_format_ms() -> None:
    assert [format_ms(v) for v in (None, 0.0123, 0.25, 12.0)] == [
        "-",
        "12.3 ms",
        "250 ms",
        "12,000 ms",
    ]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("192.0.2.10", False),
        ("dashboard.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serving_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(DashboardConfigError, match="set SESSIONS_DASHBOARD_TOKEN first"):
        serve(Settings(dashboard_host="0.0.0.0"))
    with pytest.raises(DashboardConfigError):
        serve(Settings(), host="192.0.2.10")


def test_a_short_token_is_refused_and_a_token_is_never_shown() -> None:
    with pytest.raises(ValidationError, match="dashboard_token"):
        Settings(dashboard_token="short")
    settings = Settings(dashboard_token="a-long-enough-secret-token")
    assert "a-long-enough-secret-token" not in repr(settings)


def test_the_access_log_never_holds_the_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/sessions?status=active&token=s3cret&limit=5", "1.1", 303),
        None,
    )
    assert RedactToken().filter(record)
    assert record.getMessage() == (
        '127.0.0.1:5000 - "GET /sessions?status=active&token=***&limit=5 HTTP/1.1" 303'
    )
