"""Fixtures of the fault suite: private servers, a fresh database and broker per scenario.

The scenarios about the broker take ``fault_broker``, parametrized over both first-class brokers:
a private ``redis-server`` of the test's own, or a vhost of its own on one private RabbitMQ
node shared by the session (a node takes seconds to boot). A scenario that stops or kills the
broker takes a server that nobody else uses (``redis_server``, ``rabbitmq_server``).
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator

import pytest

from tests.faults import report
from tests.faults.servers import (
    FaultBroker,
    PrivatePostgres,
    PrivateRabbitMQ,
    PrivateRedis,
    private_postgres,
    private_rabbitmq,
    private_redis,
)

#: The brokers every broker scenario runs on.
BROKERS = ("redis", "amqp")


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
def fault_database_url(shared_private_postgres: PrivatePostgres) -> Iterator[str]:
    """A new, empty database on the private cluster (the workers migrate it at start),
    dropped afterwards: kept, the run's databases took hundreds of MB of disk by its end."""
    name = f"faults_{uuid.uuid4().hex[:10]}"
    url = shared_private_postgres.create_database(name)
    try:
        yield url
    finally:
        try:
            shared_private_postgres.drop_database(name)
        except Exception as exc:  # a cluster the test broke has failed it already
            warnings.warn(f"could not drop {name}: {exc}", stacklevel=1)


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    """A private Redis server for this scenario alone."""
    with private_redis() as server:
        yield server


@pytest.fixture
def fault_broker_url(redis_server: PrivateRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def shared_private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """One private RabbitMQ node for the scenarios that do not stop it (a vhost each)."""
    with private_rabbitmq() as server:
        yield server


@pytest.fixture(params=BROKERS)
def fault_broker(request: pytest.FixtureRequest) -> Iterator[FaultBroker]:
    """This scenario's broker: a private Redis, or a fresh vhost on the shared private node."""
    if request.param == "redis":
        with private_redis() as server:
            yield FaultBroker("redis", server.url, redis=server)
        return
    node: PrivateRabbitMQ = request.getfixturevalue("shared_private_rabbitmq")
    vhost = f"faults-{uuid.uuid4().hex[:10]}"
    url = node.add_vhost(vhost)
    try:
        yield FaultBroker("amqp", url, rabbitmq=node, vhost=vhost)
    finally:
        node.delete_vhost(vhost)


@pytest.fixture
def rabbitmq_server() -> Iterator[PrivateRabbitMQ]:
    """A private RabbitMQ node for this scenario alone, which it may stop, kill and start."""
    with private_rabbitmq() as node:
        yield node
