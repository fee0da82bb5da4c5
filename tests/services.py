"""Finding the machine's PostgreSQL and Redis, and skipping (or failing, in CI) without them.

``SESSIONS_REQUIRE_SERVICES=1`` turns every "service is absent" skip into a failure, so a
CI run can never pass by silently skipping the tests that matter.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

#: Where the test suite finds PostgreSQL; databases are created and dropped under it.
POSTGRES_ADMIN_URL = os.environ.get(
    "SESSIONS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
#: Where the test suite finds Redis; each test uses a database number of its own choosing.
REDIS_URL = os.environ.get("SESSIONS_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def services_required() -> bool:
    return os.environ.get("SESSIONS_REQUIRE_SERVICES", "") not in ("", "0", "false")


def missing_service(reason: str) -> NoReturn:
    """Skip the current test because a service is absent, or fail when CI requires it."""
    if services_required():
        pytest.fail(f"{reason} (SESSIONS_REQUIRE_SERVICES=1, so this is a failure)")
    pytest.skip(reason)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def postgres_reachable() -> bool:
    url = make_url(POSTGRES_ADMIN_URL)
    return _port_open(url.host or "127.0.0.1", url.port or 5432)


def redis_reachable() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except Exception:
        return False


def require_postgres() -> None:
    if not postgres_reachable():
        missing_service(f"PostgreSQL is not answering at {make_url(POSTGRES_ADMIN_URL).host}:5432")


def require_redis() -> None:
    if not redis_reachable():
        missing_service(f"Redis is not answering at {REDIS_URL}")


@contextmanager
def temporary_postgres_database(prefix: str = "sessions_test") -> Iterator[str]:
    """A new, empty PostgreSQL database for the duration of the block, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
