"""Finding the machine's PostgreSQL, Redis and RabbitMQ; skipping (failing, in CI) without them.

``SESSIONS_REQUIRE_SERVICES=1`` turns every "service is absent" skip into a failure, so a
CI run can never pass by silently skipping the tests that matter.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

#: Where the test suite finds PostgreSQL; databases are created and dropped under it.
POSTGRES_ADMIN_URL = os.environ.get(
    "SESSIONS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
#: Where the test suite finds Redis; each test uses a database number of its own choosing.
REDIS_URL = os.environ.get("SESSIONS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: Where the test suite finds RabbitMQ (no vhost: each test creates and deletes its own).
RABBITMQ_URL = os.environ.get("SESSIONS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
#: The ``rabbitmqctl`` that manages that node (it creates the tests' vhosts).
RABBITMQCTL = os.environ.get("SESSIONS_TEST_RABBITMQCTL", "rabbitmqctl")


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


def require_rabbitmq() -> None:
    """Skip (or fail, in CI) unless RabbitMQ answers and ``rabbitmqctl`` can manage it."""
    url = urlsplit(RABBITMQ_URL)
    host, port = url.hostname or "127.0.0.1", url.port or 5672
    if not _port_open(host, port):
        missing_service(f"RabbitMQ is not answering at {host}:{port}")
    if shutil.which(RABBITMQCTL) is None:
        missing_service(f"{RABBITMQCTL} is not on PATH (needed to create a vhost for the test)")


@contextmanager
def temporary_rabbitmq_vhost(prefix: str = "sessions-test") -> Iterator[str]:
    """The AMQP URL of a new vhost on the machine's RabbitMQ (``guest`` may use it), deleted
    afterwards with everything in it; the machine's other vhosts are never touched."""
    require_rabbitmq()
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    try:
        rabbitmqctl("add_vhost", name)
    except subprocess.CalledProcessError as exc:
        missing_service(f"{RABBITMQCTL} cannot manage the RabbitMQ node: {exc.stderr.strip()}")
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{RABBITMQ_URL.rstrip('/')}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


def rabbitmqctl(*arguments: str) -> str:
    """Run ``rabbitmqctl`` against the machine's node; its output (raises when it fails)."""
    return subprocess.run(
        [RABBITMQCTL, *arguments], check=True, capture_output=True, text=True, timeout=60
    ).stdout


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


#: Where the test suite finds a MariaDB (or MySQL) server: a database the store must refuse.
MARIADB_ADMIN_URL = os.environ.get(
    "SESSIONS_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql"
)


@contextmanager
def temporary_mariadb_database(prefix: str = "sessions_test") -> Iterator[str]:
    """A new, empty MariaDB database for the duration of the block, dropped afterwards.

    Skips (fails with ``SESSIONS_REQUIRE_SERVICES=1``) without the server or the driver.
    """
    url = make_url(MARIADB_ADMIN_URL)
    try:
        import pymysql  # noqa: F401  (the driver the URL names; a test-only dependency)
    except ImportError:
        missing_service("pymysql is not installed (pip install '.[test]')")
    if not _port_open(url.host or "127.0.0.1", url.port or 3306):
        missing_service(f"MariaDB is not answering at {url.host}:{url.port or 3306}")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE `{name}`"))
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()
