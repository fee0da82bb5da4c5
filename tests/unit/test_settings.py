"""Settings: the guide's defaults, the SESSIONS_ environment prefix, consistency checks."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from pydantic import ValidationError

from sessions.bounds import MAX_DAYS, MAX_DURATION, MAX_SECONDS
from sessions.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults are checked against a process environment without any SESSIONS_ variable."""
    for name in list(os.environ):
        if name.startswith("SESSIONS_"):
            monkeypatch.delenv(name)


def test_defaults_equal_the_guide() -> None:
    settings = Settings()
    assert settings.max_idle_seconds == 1800
    assert settings.max_age == timedelta(days=7)
    assert settings.health_warn_rate == 0.3
    assert settings.health_fail_rate == 0.5
    assert settings.session_limit_idle_seconds == 900
    assert settings.max_active_sessions is None


def test_default_database_is_a_sqlite_file_in_the_working_directory() -> None:
    assert Settings().database_url == "sqlite:///sessions.db"


def test_environment_prefix_is_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONS_MAX_IDLE_SECONDS", "60")
    monkeypatch.setenv("SESSIONS_HEALTH_FAIL_RATE", "0.8")
    monkeypatch.setenv("SESSIONS_MAX_ACTIVE_SESSIONS", "3")
    monkeypatch.setenv("SESSIONS_DATABASE_URL", "postgresql+psycopg://db/sessions")
    monkeypatch.setenv("MAX_IDLE_SECONDS", "5")  # no prefix: not ours
    settings = Settings()
    assert settings.max_idle_seconds == 60
    assert settings.health_fail_rate == 0.8
    assert settings.max_active_sessions == 3
    assert settings.database_url == "postgresql+psycopg://db/sessions"


def test_ledger_retention_shorter_than_the_redelivery_window_is_refused() -> None:
    # spool 7 days + visibility 1 hour: 7 days of ledger is one hour too short.
    with pytest.raises(ValidationError) as caught:
        Settings(ledger_retention_days=7)
    message = str(caught.value)
    assert "ledger_retention_days must outlive" in message
    assert "spool_max_age_days + visibility_timeout_seconds" in message
    assert "counted twice" in message


def test_ledger_retention_refused_from_the_environment_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SESSIONS_SPOOL_MAX_AGE_DAYS", "20")
    with pytest.raises(ValidationError, match="ledger_retention_days must outlive"):
        Settings()


def test_ledger_retention_exactly_the_redelivery_window_is_accepted() -> None:
    settings = Settings(
        ledger_retention_days=2, spool_max_age_days=1, visibility_timeout_seconds=86_400
    )
    assert settings.ledger_retention == timedelta(days=2)


def test_warn_rate_above_fail_rate_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(health_warn_rate=0.6, health_fail_rate=0.5)
    assert "health_warn_rate (0.6) must not exceed health_fail_rate (0.5)" in str(caught.value)


def test_warn_rate_equal_to_fail_rate_is_accepted() -> None:
    assert Settings(health_warn_rate=0.5, health_fail_rate=0.5).health_warn_rate == 0.5


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_idle_seconds": 0},
        {"health_fail_rate": 1.5},
        {"health_warn_rate": -0.1},
        {"max_active_sessions": 0},
        {"health_min_requests": 0},
    ],
)
def test_out_of_range_values_are_refused(overrides: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match=next(iter(overrides))):
        Settings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "max_idle_seconds",
        "session_limit_idle_seconds",
        "visibility_timeout_seconds",
        "max_age_days",
        "ended_retention_days",
        "ledger_retention_days",
        "spool_max_age_days",
    ],
)
@pytest.mark.parametrize("text", ["1e300", "inf", "nan", "-1"])
def test_a_duration_beyond_the_sweeps_bounds_is_refused_naming_it(
    name: str, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeps take at most 100 years (sessions.bounds): so do the settings they default to,
    refused with pydantic's error naming the variable, never an ``OverflowError`` later."""
    monkeypatch.setenv(f"SESSIONS_{name.upper()}", text)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_the_longest_durations_the_sweeps_take_are_accepted() -> None:
    settings = Settings(
        max_idle_seconds=MAX_SECONDS, max_age_days=MAX_DAYS, ledger_retention_days=MAX_DAYS
    )
    assert settings.max_age == MAX_DURATION
    assert settings.ledger_retention == MAX_DURATION


@pytest.mark.parametrize(
    ("broker", "confirmer", "on_redis"),
    [
        ("redis://127.0.0.1:6379/0", "auto", True),
        ("rediss://cache.example:6380/1", "auto", True),
        ("filesystem://", "auto", False),
        ("amqp://guest:guest@127.0.0.1:5672/x", "auto", False),
        ("redis://127.0.0.1:6379/0", "ledger", False),
        ("redis://127.0.0.1:6379/0", "redis", True),
    ],
)
def test_the_confirmer_follows_the_broker_unless_named(
    broker: str, confirmer: str, on_redis: bool
) -> None:
    from sessions.confirming import LedgerConfirmer, confirmer_for
    from sessions.redis_confirming import RedisConfirmer

    settings = Settings(broker_url=broker, confirmer=confirmer)  # type: ignore[arg-type]
    assert settings.confirms_on_redis is on_redis
    chosen = confirmer_for(settings)
    assert isinstance(chosen, RedisConfirmer if on_redis else LedgerConfirmer)


def test_the_redis_confirmer_on_another_broker_is_refused_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessions.settings import describe_settings_error

    monkeypatch.setenv("SESSIONS_CONFIRMER", "redis")
    monkeypatch.setenv("SESSIONS_BROKER_URL", "amqp://guest:secret@127.0.0.1:5672/x")
    with pytest.raises(ValidationError) as raised:
        Settings()
    message = describe_settings_error(raised.value)
    assert "confirmer 'redis'" in message and "redis:// or rediss:// broker_url" in message
    assert "secret" not in message


def test_an_unknown_confirmer_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessions.settings import describe_settings_error

    monkeypatch.setenv("SESSIONS_CONFIRMER", "database")
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert "SESSIONS_CONFIRMER:" in describe_settings_error(raised.value)


def test_the_confirmation_ttl_is_an_hour_unless_set() -> None:
    assert Settings(spool_max_age_days=2).confirmation_ttl == timedelta(hours=1)
    assert Settings(confirmation_ttl_seconds=600).confirmation_ttl == timedelta(minutes=10)
    with pytest.raises(ValidationError, match="confirmation_ttl_seconds"):
        Settings(confirmation_ttl_seconds=0)
