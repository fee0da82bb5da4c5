"""Fixtures of the fault suite: private servers, a fresh database and broker per scenario."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.faults import report
from tests.faults.servers import PrivatePostgres, PrivateRedis, private_postgres, private_redis


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if report.ROWS:
        terminalreporter.section("fault suite")
        terminalreporter.write_line(report.table())


@pytest.fixture(scope="session")
def shared_private_postgres() -> Iterator[PrivatePostgres]:
    """One private cluster for the scenarios that do not stop it (each gets its own database)."""
    with private_postgres() as server:
        yield server


@pytest.fixture
def fault_database_url(shared_private_postgres: PrivatePostgres) -> str:
    """A new, empty database on the private cluster (the workers migrate it at start)."""
    return shared_private_postgres.create_database(f"faults_{uuid.uuid4().hex[:10]}")


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    """A private Redis server for this scenario alone."""
    with private_redis() as server:
        yield server


@pytest.fixture
def fault_broker_url(redis_server: PrivateRedis) -> str:
    return redis_server.url
