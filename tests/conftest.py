"""Shared fixtures: a migrated store on SQLite and on PostgreSQL, fresh for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from sessions.settings import Settings, get_settings
from sessions.store import SessionStore
from sessions.tables import Base
from tests.support import diagnostics
from tests.support.services import require_postgres, temporary_postgres_database

# pytest-celery 1.x brings Docker-based fixtures that shadow Celery's own; there is no
# Docker engine here, so Celery's in-process fixtures are loaded explicitly.
pytest_plugins = ("celery.contrib.pytest",)

BACKENDS = ("sqlite", "postgresql")


def pytest_report_header() -> str:
    """The machine the run starts on (free disk, memory, load), at the head of the log."""
    return "machine: " + diagnostics.machine_state().replace("\n", "; ")


#: Ids of the tests that failed in this run, for the diagnostics printed last.
_failed: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed.add(report.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What each failed test's waits read of its workers and servers when they gave up
    (:mod:`tests.support.diagnostics`), after the failure reports and the other summaries,
    so that a CI log's tail still holds it."""
    readings = [(test, reading) for test, reading in diagnostics.RECORDED if test in _failed]
    if not readings:
        return
    terminalreporter.section("what the failed waits saw")
    for test, reading in readings:
        terminalreporter.write_line(f"{test}:\n{reading}")


@pytest.fixture(autouse=True)
def private_spool(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test's trackers spool into a folder of its own, never the user's cache, and a
    tracker built from default settings confirms its batches against a private database file,
    never a ``sessions.db`` in the working directory."""
    monkeypatch.setenv("SESSIONS_SPOOL_DIR", str(tmp_path_factory.mktemp("spool")))
    if "SESSIONS_DATABASE_URL" not in os.environ:
        private = tmp_path_factory.mktemp("default-db") / "sessions.db"
        monkeypatch.setenv("SESSIONS_DATABASE_URL", f"sqlite:///{private}")
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the test run (tests truncate it, never reuse data)."""
    require_postgres()
    with temporary_postgres_database() as url:
        store = SessionStore(url, settings=Settings())
        store.upgrade()
        store.dispose()
        yield url


def _truncate(url: str) -> None:
    store = SessionStore(url, settings=Settings())
    names = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with store.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {names}"))
    store.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
        SessionStore(url, settings=Settings()).upgrade()
        return url
    url: str = request.getfixturevalue("postgres_url")
    _truncate(url)
    return url


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def store(database_url: str, settings: Settings) -> Iterator[SessionStore]:
    store = SessionStore(database_url, settings=settings)
    yield store
    store.dispose()
