"""A settings object never shows a secret: not in its repr, not in a validation error."""

from __future__ import annotations

import os
import traceback

import pytest
from pydantic import ValidationError

from sessions.settings import Settings

TOKEN = "abcdefghijklmnopqrstuvwxyz"  # 26 characters: the probe


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SESSIONS_"):
            monkeypatch.delenv(name)


def _shown(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` prints."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_repr_and_str_mask_the_urls_and_the_token() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://u:hunter2@h/db?sslpassword=hunter3",
        broker_url="redis://:hunter4@h:6379/0",
        dashboard_token=TOKEN,
    )
    for text in (repr(settings), str(settings)):
        assert "hunter" not in text and TOKEN[4:] not in text
        assert "database_url='postgresql+psycopg://u:***@h/db?sslpassword=***'" in text
        assert "broker_url='redis://:***@h:6379/0'" in text
    assert settings.database_url.endswith("sslpassword=hunter3")  # the value itself is intact
    assert settings.dashboard_token is not None
    assert settings.dashboard_token.get_secret_value() == TOKEN


def test_a_too_short_token_is_refused_naming_the_field_and_rule_but_not_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SESSIONS_DASHBOARD_TOKEN", "short-secret")
    with pytest.raises(ValidationError) as caught:
        Settings()
    shown = _shown(caught.value)
    assert "dashboard_token" in shown and "must be at least 16 characters long" in shown
    assert "short-secret" not in shown


def test_a_model_error_does_not_show_the_token_among_the_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: ``input_value={'health_warn_rate': '0.9...efghijklmnopqrstuvwxyz'}``."""
    monkeypatch.setenv("SESSIONS_DASHBOARD_TOKEN", TOKEN)
    monkeypatch.setenv("SESSIONS_DATABASE_URL", "postgresql://u:hunter2@h/db")
    monkeypatch.setenv("SESSIONS_HEALTH_WARN_RATE", "0.9")
    with pytest.raises(ValidationError) as caught:
        Settings()
    shown = _shown(caught.value)
    assert "health_warn_rate (0.9) must not exceed health_fail_rate (0.5)" in shown
    assert "hunter2" not in shown
    for start in range(len(TOKEN) - 5):  # not even a tail of it
        assert TOKEN[start : start + 6] not in shown


def test_a_field_error_names_the_field_without_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONS_DASHBOARD_TOKEN", TOKEN)
    monkeypatch.setenv("SESSIONS_DASHBOARD_PORT", "70000")
    with pytest.raises(ValidationError) as caught:
        Settings()
    shown = _shown(caught.value)
    assert "dashboard_port" in shown and "less than or equal to 65535" in shown
    assert TOKEN[4:] not in shown


def test_dashboard_port_zero_means_any_free_port() -> None:
    assert Settings(dashboard_port=0).dashboard_port == 0
    with pytest.raises(ValidationError, match="dashboard_port"):
        Settings(dashboard_port=-1)
