"""The `sessions` command against a real database (both backends), as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from sessions import cli, deep_json
from sessions import histogram as h
from sessions.cli import app
from sessions.settings import get_settings
from sessions.store import SessionStore
from tests.integration.support import (
    at,
    batch,
    create,
    end,
    nested_document,
    nesting,
    record,
    snapshot,
    store_metadata_text,
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as they need, so no cell is cut in the captured output."""
    monkeypatch.setattr(cli, "console", Console(width=200))


@pytest.fixture
def seeded(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[SessionStore]:
    """Three sessions of two users, the CLI pointed at the same database."""
    store.apply(
        batch(
            create("user-456-device-1", 0, user_id="user-456"),
            *[record("user-456-device-1", n, processing_time=0.5, error=n < 3) for n in range(4)],
            create("user-456-device-2", 0, user_id="user-456"),
            *[record("user-456-device-2", n, processing_time=1.0) for n in range(6)],
            end("user-456-device-2", 7),
            record("user-789", 1, user_id="user-789", processing_time=2.0),
        )
    )
    monkeypatch.setenv("SESSIONS_DATABASE_URL", store.url)
    get_settings.cache_clear()
    yield store
    get_settings.cache_clear()


def _json(*arguments: str) -> object:
    result = runner.invoke(app, [*arguments, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_list_filters_by_user_and_status(seeded: SessionStore) -> None:
    listed = _json("list", "--user", "user-456")
    assert isinstance(listed, list)
    assert [s["session_id"] for s in listed] == ["user-456-device-1", "user-456-device-2"]
    active = _json("list", "--user", "user-456", "--status", "active")
    assert isinstance(active, list) and [s["session_id"] for s in active] == ["user-456-device-1"]
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "user-789" in table.output and "3 sessions" in table.output


def test_piped_output_keeps_each_row_on_one_line(seeded: SessionStore) -> None:
    """Into a pipe, with no ``COLUMNS``, a table is as wide as its values (rich would fit it
    to 80 columns, its default without a terminal, and cut or fold the ids): each row is one
    line holding all its values, ids of the longest kind too."""
    long_id, long_user = "s" * 255, "u" * 255
    seeded.apply(batch(create(long_id, 0, user_id=long_user), record(long_id, 1)))
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    listed = subprocess.run(
        [sys.executable, "-m", "sessions.cli", "list"],
        env=environment | {"SESSIONS_DATABASE_URL": seeded.url},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = [line for line in listed.splitlines() if line.startswith("│")]
    assert len(rows) == 4, listed
    for row in rows:
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        expected = {
            "user-456-device-1": ("user-456", "4"),
            "user-456-device-2": ("user-456", "6"),
            "user-789": ("user-789", "1"),
            long_id: (long_user, "1"),
        }
        assert (cells[1], cells[3]) == expected[cells[0]], row


def test_show_prints_every_field_and_fails_for_an_unknown_id(seeded: SessionStore) -> None:
    shown = _json("show", "user-456-device-1")
    assert isinstance(shown, dict)
    assert (shown["request_count"], shown["error_count"], shown["error_rate"]) == (4, 3, 0.75)
    missing = runner.invoke(app, ["show", "nobody"])
    assert missing.exit_code == 1 and "no session 'nobody'" in missing.output


def test_stats_equal_the_stores_aggregate(seeded: SessionStore) -> None:
    stats = _json("stats", "--user", "user-456")
    assert isinstance(stats, dict)
    expected = seeded.aggregate(user_id="user-456")
    assert stats["sessions"] == expected.sessions == 2
    assert stats["request_count"] == expected.request_count == 10
    assert stats["error_count"] == expected.error_count == 3
    assert stats["total_processing_time"] == pytest.approx(8.0)


def test_stats_json_is_the_stores_aggregate_with_percentiles_in_a_window(
    seeded: SessionStore,
) -> None:
    stats = _json(
        "stats",
        "--user",
        "user-456",
        "--since",
        "2024-01-01T12:00:00Z",
        "--until",
        "2024-01-01T14:06:00+02:00",  # 12:06 UTC: device-1 (last active 12:03), not device-2
    )
    expected = seeded.aggregate(user_id="user-456", since=at(0), until=at(6))
    assert stats == expected.model_dump(mode="json")
    assert (expected.sessions, expected.request_count) == (1, 4)
    assert stats["processing_time_p95"] == h.representative(h.bucket_of(0.5))  # type: ignore[index]
    assert _json("stats", "--status", "completed", "--until", "1d") == (
        seeded.aggregate(status="completed").model_dump(mode="json")
    )


def test_stats_table_shows_rates_tokens_cost_and_percentiles(seeded: SessionStore) -> None:
    seeded.apply(batch(record("user-789", 2, input_tokens=7, output_tokens=3, cost=0.25)))
    result = runner.invoke(app, ["stats", "--user", "user-789", "--since", "2024-01-01"])
    assert result.exit_code == 0, result.output
    rows = {" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()}
    assert {"requests 2", "error rate 0.0%", "input tokens 7", "cost 0.2500"} <= rows
    # Estimates of 0.5 s and 2.0 s: the geometric middles of their buckets.
    assert {"p50 processing time 0.503s", "p99 processing time 1.972s"} <= rows
    title = " ".join(result.output.split())
    assert "all sessions of user-789, last active since 2024-01-01 00:00:00 UTC" in title


def _usage_error(result: Result, message: str) -> None:
    """A usage error as click shows one: exit status 2, ``message`` on one ``Error:`` line,
    no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


#: What --since / --until take: the store's bounds for a moment (sessions.bounds).
MOMENT_RULE = "must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--since", "3 days"], "Invalid value for '--since': '3 days' is neither"),
        (["--until", "soon"], "Invalid value for '--until'"),
        (
            ["--since", "2h", "--until", "3h"],
            "Invalid value for '--since': must be before --until",
        ),
        (  # converts to a time in the year 0: once a StatementError (OverflowError) traceback
            ["--since", "0001-01-01T00:00:00+01:00"],
            f"Invalid value for '--since': {MOMENT_RULE} (got 0001-01-01T00:00:00+01:00)",
        ),
        (  # the year 10000 in UTC
            ["--until", "9999-12-31T23:59:59-01:00"],
            f"Invalid value for '--until': {MOMENT_RULE} (got 9999-12-31T23:59:59-01:00)",
        ),
        (["--since", "1969-12-31T23:59:59Z"], f"Invalid value for '--since': {MOMENT_RULE}"),
        (["--since", "999999999d"], "Invalid value for '--since': '999999999d' reaches back"),
        (["--since", "40000d"], f"Invalid value for '--since': {MOMENT_RULE}"),  # 110 years
        (["--user", "user 456"], "Invalid value for '--user': must be 1 to 255 printable ASCII"),
    ],
)
def test_stats_refuses_a_bad_window_naming_the_option(
    seeded: SessionStore, arguments: list[str], message: str
) -> None:
    _usage_error(runner.invoke(app, ["stats", *arguments]), message)


def test_stats_takes_a_window_at_the_bounds(seeded: SessionStore) -> None:
    window = ["--since", "1970-01-01T00:00:00Z", "--until", "9999-12-31T23:59:59Z"]
    assert _json("stats", *window) == seeded.aggregate().model_dump(mode="json")


def test_health_lists_sessions_above_the_warn_rate(seeded: SessionStore) -> None:
    unhealthy = _json("health")
    assert isinstance(unhealthy, list)
    assert [s["session_id"] for s in unhealthy] == ["user-456-device-1"]
    table = runner.invoke(app, ["health"])
    assert table.exit_code == 0 and "FAIL" in table.output


def test_cleanup_dry_run_changes_nothing_then_cleanup_expires(seeded: SessionStore) -> None:
    dry = runner.invoke(app, ["cleanup", "--idle", "60", "--dry-run"])
    assert dry.exit_code == 0 and "would expire 2 sessions" in dry.output
    assert seeded.count_active() == 2
    done = runner.invoke(app, ["cleanup", "--idle", "60"])
    assert done.exit_code == 0 and "expired 2 sessions" in done.output
    assert seeded.count_active() == 0


def test_cleanup_by_age(seeded: SessionStore) -> None:
    result = runner.invoke(app, ["cleanup", "--age", "7"])
    assert result.exit_code == 0 and "expired 2 sessions (older than 7 days)" in result.output


IDLE_RULE = "must be a finite number of seconds above 0 and at most 3155760000 (100 years)"
AGE_RULE = "must be a finite number of days above 0 and at most 36525 (100 years)"


@pytest.mark.parametrize("dry_run", [["--dry-run"], []], ids=["dry-run", "real"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--idle", "-1", f"{IDLE_RULE} (got -1.0)"),  # once: "would expire" every session
        ("--idle", "0", f"{IDLE_RULE} (got 0.0)"),
        ("--idle", "nan", f"{IDLE_RULE} (got nan)"),  # these three: tracebacks from timedelta
        ("--idle", "inf", f"{IDLE_RULE} (got inf)"),
        ("--idle", "1e300", f"{IDLE_RULE} (got 1e+300)"),
        ("--idle", "soon", "'soon' is not a number"),
        ("--age", "-1", f"{AGE_RULE} (got -1.0)"),
        ("--age", "0", f"{AGE_RULE} (got 0.0)"),
        ("--age", "nan", f"{AGE_RULE} (got nan)"),
        ("--age", "1e300", f"{AGE_RULE} (got 1e+300)"),  # 1e300 days: timedelta's overflow
    ],
)
def test_cleanup_refuses_a_threshold_out_of_the_settings_bounds_and_expires_nothing(
    seeded: SessionStore, option: str, value: str, message: str, dry_run: list[str]
) -> None:
    before = snapshot(seeded)
    result = runner.invoke(app, ["cleanup", option, value, *dry_run])
    _usage_error(result, f"Invalid value for '{option}': {message}")
    assert snapshot(seeded) == before and seeded.count_active() == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["list", "--limit", "0"], "Invalid value for '--limit'"),
        (["list", "--limit", "10001"], "Invalid value for '--limit'"),
        (["list", "--user", "a\x01"], "Invalid value for '--user': must be 1 to 255 printable"),
        (["list", "--after", "x y"], "Invalid value for '--after': must be 1 to 255 printable"),
        (["list", "--status", "bogus"], "Invalid value for '--status'"),
        (["show", "a b"], "Invalid value for 'session_id': must be 1 to 255 printable ASCII"),
        (["demo", "--users", "0"], "Invalid value for '--users'"),  # was a ZeroDivisionError
        (["demo", "--sessions", "-1"], "Invalid value for '--sessions'"),
        (["demo", "--requests", "0"], "Invalid value for '--requests'"),
    ],
)
def test_an_option_out_of_bounds_is_a_usage_error_naming_it(
    seeded: SessionStore, arguments: list[str], message: str
) -> None:
    _usage_error(runner.invoke(app, arguments), message)


def test_show_and_list_print_a_session_whose_stored_metadata_is_nested_too_deep(
    seeded: SessionStore,
) -> None:
    """A row written before writes were depth-bounded (5,000 levels: beyond ``json``'s
    decoder, let alone pydantic's serializer): every read prints it, cut, and the others."""
    store_metadata_text(seeded, "user-456-device-1", nested_document(5_000))
    shown = _json("show", "user-456-device-1")
    assert isinstance(shown, dict)
    assert nesting(shown["metadata"]) == (deep_json.MAX_READ_DEPTH, deep_json.CUT)
    listed = _json("list")
    assert isinstance(listed, list) and len(listed) == 3 and listed[0] == shown
    table = runner.invoke(app, ["show", "user-456-device-1"])
    assert table.exit_code == 0 and "<cut: nested deeper than" in table.output


def test_an_unreachable_database_is_a_clear_error_with_the_password_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "SESSIONS_DATABASE_URL", "postgresql+psycopg://agent:s3cret@127.0.0.1:1/sessions"
    )
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["stats"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "cannot reach the database at postgresql+psycopg://agent:***@127.0.0.1:1" in (
        result.output
    )
    assert "s3cret" not in result.output


def test_an_unmigrated_database_says_to_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty.db").touch()
    monkeypatch.setenv("SESSIONS_DATABASE_URL", f"sqlite:///{tmp_path}/empty.db")
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["list"])
        assert result.exit_code == 2 and "sessions db upgrade" in result.output
        upgraded = runner.invoke(app, ["db", "upgrade"])
        assert upgraded.exit_code == 0 and "migrated to revision" in upgraded.output
        again = runner.invoke(app, ["db", "upgrade"])
        assert again.exit_code == 0 and "was already at revision" in again.output
        assert runner.invoke(app, ["list"]).exit_code == 0
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["stats"],
        ["health"],
        ["show", "s-1"],
        ["cleanup"],
        ["db", "upgrade"],
        ["dashboard"],
    ],
)
def test_a_sqlite_file_that_is_not_a_database_is_a_clear_error(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a ``DatabaseError`` traceback: now one line naming the URL and what is wrong."""
    garbage = tmp_path / "sessions.db"
    garbage.write_bytes(b"this is not a SQLite database, just some bytes\n" * 10)
    monkeypatch.setenv("SESSIONS_DATABASE_URL", f"sqlite:///{garbage}")
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, command)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    [error] = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert f"the database at sqlite:///{garbage}: " in error
    assert error.endswith("file is not a database")
    assert "Traceback" not in result.output
    assert garbage.read_bytes().startswith(b"this is not a SQLite database")  # left as it was


@pytest.mark.parametrize(
    "command", [["list"], ["stats"], ["health"], ["show", "s-1"], ["cleanup", "--dry-run"]]
)
def test_a_missing_sqlite_file_is_an_error_and_is_not_created(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "sessions.db"  # in a folder that exists: SQLite would create it
    monkeypatch.setenv("SESSIONS_DATABASE_URL", f"sqlite:///{missing}")
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert f"no file {missing}" in result.output.replace("\n", "")
        assert "sessions db upgrade" in result.output
        assert not missing.exists()
    finally:
        get_settings.cache_clear()


def _refuse_exec(*arguments: object) -> None:
    raise AssertionError(f"the CLI tried to replace the test process with {arguments}")


def test_worker_starts_celery_without_asking_the_broker_or_the_database_first(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sessions worker` is `celery -A sessions.worker worker`: it waits for servers that are
    down."""
    execs: list[tuple[object, ...]] = []

    def record_exec(*arguments: object) -> None:
        execs.append(arguments)
        raise SystemExit(0)  # execv does not return

    monkeypatch.setattr(cli.os, "execv", record_exec)
    monkeypatch.setenv("SESSIONS_DATABASE_URL", f"sqlite:///{tmp_path}/w.db")
    monkeypatch.setenv("SESSIONS_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")  # nobody there
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["worker", "--concurrency", "1"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    [(executable, command)] = execs
    assert executable == sys.executable
    assert command == [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "sessions.worker",
        "worker",
        "-Q",
        "sessions.events,sessions.maintenance",
        "--loglevel",
        "INFO",
        "--concurrency",
        "1",
    ]
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    ("variable", "value", "named_rule"),
    [
        ("SESSIONS_DASHBOARD_PORT", "70000", "SESSIONS_DASHBOARD_PORT: Input should be less than"),
        ("SESSIONS_DASHBOARD_TOKEN", "short-secret", "SESSIONS_DASHBOARD_TOKEN: must be at least"),
        ("SESSIONS_MAX_AGE_DAYS", "nan", "SESSIONS_MAX_AGE_DAYS:"),
    ],
)
def test_a_bad_setting_is_one_error_line_naming_the_variable_not_its_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named_rule: str
) -> None:
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: invalid settings: "), result.output
    assert named_rule in result.output
    assert value not in result.output.replace(variable, "")
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
