"""A SESSIONS_DATABASE_URL SQLAlchemy cannot read: one line naming the setting, never a
traceback, never the URL (review of issue 12, finding 10: ``h:notaport`` gave a 50-line
``ValueError`` in the CLI, and a worker that logged it and went on instead of exiting 78)."""

from __future__ import annotations

import importlib

import pytest
from typer.testing import CliRunner

from sessions.cli import app as cli
from sessions.database import check_supported, missing_sqlite_file
from sessions.errors import UnsupportedDatabaseError

UNREADABLE = ["postgresql+psycopg://u:hunter2@h:notaport/db", "postgres ql://u:hunter2@h/db"]
SAID = "SESSIONS_DATABASE_URL is not a database URL SQLAlchemy can read"


@pytest.mark.parametrize("url", UNREADABLE)
def test_the_store_refuses_it_naming_the_setting_not_the_password(url: str) -> None:
    for check in (check_supported, missing_sqlite_file):
        with pytest.raises(UnsupportedDatabaseError, match=SAID) as refused:
            check(url)
        assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("url", UNREADABLE)
def test_the_cli_says_so_in_one_line_and_exits_2(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONS_DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: {SAID}") and "Traceback" not in result.output
    assert "hunter2" not in result.output


def test_the_worker_refuses_to_start_with_78(monkeypatch: pytest.MonkeyPatch) -> None:
    worker_app = importlib.import_module("sessions.worker.celery_app")
    monkeypatch.setenv("SESSIONS_DATABASE_URL", UNREADABLE[0])
    monkeypatch.setattr(worker_app, "_schema_ready", False)
    monkeypatch.setattr(worker_app, "get_settings", lambda: worker_app.Settings())
    with pytest.raises(SystemExit) as stopped:
        worker_app._prepare()
    assert stopped.value.code == 78
