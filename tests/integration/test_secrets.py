"""Credentials never shown: the CLI and a worker's start-up log, as an operator sees them.

The issue's probes: a password in the URL's query string (``?password=hunter2``) printed in
clear by ``sessions list``, ``sessions db upgrade`` and the worker's start-up log, and a
password with an unencoded ``@`` leaking its tail. PostgreSQL here trusts local connections,
so a URL carrying a password still connects. (The dashboard's header is checked in
``test_dashboard.py``, its access log in ``test_dashboard_server.py``.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sessions import cli
from sessions.cli import app
from sessions.settings import get_settings
from tests.support.services import (
    RABBITMQ_URL,
    require_rabbitmq,
    require_redis,
    temporary_postgres_database,
)
from tests.support.waiting import cpu_progress, wait_for
from tests.support.workers_harness import (
    DEADLINE,
    CeleryProcess,
    claimed_redis_db,
    service_environment,
)

runner = CliRunner()
SECRET = "hunter2"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Lines as long as they need (a wrapped URL could not be compared), fresh settings."""
    monkeypatch.setattr(cli, "console", Console(width=400))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    with temporary_postgres_database("sessions_secrets") as url:
        yield url


def test_db_upgrade_masks_a_password_in_the_query_string(
    empty_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{empty_postgres}?password={SECRET}&connect_timeout=10"
    monkeypatch.setenv("SESSIONS_DATABASE_URL", url)
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"database at {empty_postgres}?password=***&connect_timeout=10 migrated to" in (
        result.output
    )
    assert SECRET not in result.output
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and SECRET not in listed.output


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://agent@127.0.0.1:1/sessions?password={SECRET}",
        f"postgresql+psycopg://agent@127.0.0.1:1/sessions?%70assword={SECRET}",
        f"postgresql+psycopg://agent@127.0.0.1:1/sessions?sslpassword={SECRET}&sslmode=require",
        f"postgresql+psycopg://agent:{SECRET}@127.0.0.1:1/sessions",
    ],
)
def test_an_unreachable_database_is_named_without_its_credentials(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONS_DATABASE_URL", url)
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 2
    assert "cannot reach the database at postgresql+psycopg://agent" in result.output
    assert "127.0.0.1:1/sessions" in result.output
    assert SECRET not in result.output


@pytest.mark.parametrize("command", [["list"], ["db", "upgrade"], ["worker"]])
def test_a_password_with_an_unencoded_at_is_refused_without_its_tail(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, SQLAlchemy took ``ter2@127.0.0.1`` for the host and the driver printed it."""
    monkeypatch.setenv("SESSIONS_DATABASE_URL", "postgresql+psycopg://agent:hun@ter2@127.0.0.1:1/s")
    monkeypatch.setattr(cli.os, "execv", _refuse_exec)
    result = runner.invoke(app, command)
    assert result.exit_code in (2, 78), result.output
    assert "the database URL postgresql+psycopg://agent:***@127.0.0.1:1/s has an '@'" in (
        result.output
    )
    assert "write it as %40" in result.output
    assert "hun" not in result.output.replace("has an", "") and "ter2" not in result.output


def _refuse_exec(*arguments: object) -> None:
    raise AssertionError(f"the CLI started {arguments} with a URL it should have refused")


# -- a worker's start-up log --------------------------------------------------------------------


@pytest.fixture(params=["redis", "amqp"])
def broker_with_password(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A broker URL with a password, and what the worker's log ends with on it.

    The machine's Redis user ``default`` has no password, so it takes any: the worker
    connects. RabbitMQ refuses a wrong one, and Celery (5.7) treats that as unrecoverable:
    the worker logs it and exits.
    """
    if request.param == "redis":
        require_redis()
        with claimed_redis_db() as url:
            yield url.replace("redis://", f"redis://default:{SECRET}@", 1), r"@\S+ ready\."
    else:
        require_rabbitmq()
        url = RABBITMQ_URL.replace("guest:guest@", f"guest:{SECRET}@") + "/sessions-secrets"
        yield url, "ACCESS_REFUSED"


def test_a_workers_start_up_log_shows_no_credential(
    empty_postgres: str, broker_with_password: tuple[str, str], tmp_path: Path
) -> None:
    """The banner and the broker's lines (Celery masks the broker's password itself, through
    kombu's ``as_uri``), and the migration line (ours, with a password in the database URL's
    query string)."""
    broker_url, last = broker_with_password
    environment = service_environment(
        SESSIONS_DATABASE_URL=f"{empty_postgres}?password={SECRET}",
        SESSIONS_BROKER_URL=broker_url,
    )
    worker = CeleryProcess(
        "worker",
        [
            "worker",
            "--loglevel=INFO",
            "--concurrency=1",
            f"--hostname=secrets-{uuid.uuid4().hex[:8]}@%h",
        ],
        environment,
        tmp_path,
    )
    try:
        wait_for(
            lambda: re.search(last, worker.log) or worker.process.poll() is not None,
            f"{last!r} in the worker log",
            progress=cpu_progress(worker.process.pid),
            stall=DEADLINE,
        )
    finally:
        worker.stop()
    log = worker.log
    assert re.search(last, log), log[-3000:]
    assert f"database at {empty_postgres}?password=*** is at the newest schema" in log
    assert re.search(r"transport: +\S+://\w+:\*\*@127\.0\.0\.1:", log), log[-3000:]
    assert SECRET not in log
