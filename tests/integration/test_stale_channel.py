"""sessions.worker.stale_channel against a real, private redis-server that is SIGKILLed.

Each test leaves a kombu connection exactly where Celery 5.7's consumer leaves it after losing
the broker: two channels with a ``BRPOP`` in flight (the worker's task channel and its
control channel), Redis killed, then ``connection.collect()`` and ``connection.close()``
(``Consumer.on_connection_error_after_connected``). A message the consumer received before
the loss is then acknowledged, as a task finishing a moment later is.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kombu import Connection, Exchange, Queue
from kombu.message import Message
from kombu.transport import redis as kombu_redis

from sessions.worker import stale_channel
from tests.faults.servers import PrivateRedis, private_redis

#: Seconds a socket of the test's kombu connection may wait (the server is killed under it).
SOCKET_TIMEOUT = 2.0

log = logging.getLogger(__name__)


@dataclass
class Lost:
    """A connection that lost its broker with one received, unacknowledged message."""

    connection: Connection
    message: Message
    server: PrivateRedis

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What Celery passes to ``ack_log_error``: the transport's connection errors."""
        return tuple(self.connection.connection_errors) + tuple(self.connection.channel_errors)


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


def received_then_lost(server: PrivateRedis) -> Lost:
    """Receive one message on a consuming connection, then SIGKILL Redis under it."""
    connection = Connection(
        server.url,
        transport_options={
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
        },
    )
    exchange = Exchange("stale", type="direct")
    tasks, control = Queue("tasks", exchange, "tasks"), Queue("control", exchange, "control")
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=exchange, routing_key="tasks", declare=[tasks, control])
    received: list[Message] = []
    connection.Consumer([tasks], callbacks=[lambda _, message: received.append(message)]).consume()
    connection.Consumer(
        [control], channel=connection.channel(), callbacks=[lambda _, m: received.append(m)]
    ).consume()
    connection.drain_events(timeout=10)
    # One more turn that finds nothing: each channel is left with a BRPOP in flight, as the
    # worker's event loop always has.
    with pytest.raises(socket.timeout):
        connection.drain_events(timeout=0.2)
    assert [message.payload for message in received] == [{"n": 1}]
    server.stop()  # SIGKILL
    return Lost(connection, received[0], server)


def lose_it_as_celery_does(lost: Lost) -> None:
    """What Celery 5.7's consumer does on a connection loss, in that order."""
    lost.connection.collect(socket_timeout=SOCKET_TIMEOUT)
    lost.connection.close()


@pytest.fixture
def without_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's own ``Channel._connparams``, as if :func:`stale_channel.install` never ran."""
    stale_channel.install()  # so that the original is reachable as __wrapped__
    original = kombu_redis.Channel._connparams.__wrapped__
    monkeypatch.setattr(kombu_redis.Channel, "_connparams", original)
    assert not stale_channel.installed()


@pytest.fixture
def with_the_guard() -> None:
    stale_channel.install()
    assert stale_channel.installed()


@pytest.mark.usefixtures("without_the_guard")
def test_the_installed_kombu_still_needs_the_guard(redis_server: PrivateRedis) -> None:
    """The fault itself, in the installed kombu: if this fails, kombu fixed it (drop the guard
    and the README's paragraph on it)."""
    lost = received_then_lost(redis_server)
    with pytest.raises(AttributeError, match="hostname"):
        lose_it_as_celery_does(lost)
    redis_server.start()
    with pytest.raises(AttributeError, match="hostname"):
        lost.message.ack_log_error(log, lost.errors)


@pytest.mark.usefixtures("with_the_guard")
def test_a_lost_connection_closes_and_its_ack_fails_as_a_connection_error(
    redis_server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    lost = received_then_lost(redis_server)
    lose_it_as_celery_does(lost)  # raises nothing
    redis_server.start()  # empty: the message is gone from Redis with everything else

    with caplog.at_level(logging.CRITICAL, logger=__name__):
        lost.message.ack_log_error(log, lost.errors)  # logged, not raised
    assert "Couldn't ack" in caplog.text and "DetachedChannelError" in caplog.text
    assert not lost.message.acknowledged  # nothing was done: Redis never heard of it
    with pytest.raises(stale_channel.DetachedChannelError):
        lost.message.reject(requeue=True)  # Celery's reject_log_error logs this the same way
    assert issubclass(stale_channel.DetachedChannelError, lost.errors)


@pytest.mark.usefixtures("with_the_guard")
def test_a_new_connection_after_the_loss_works(redis_server: PrivateRedis) -> None:
    """The guard refuses only the old connection's channels: a new one publishes, consumes and
    acknowledges on the restarted server."""
    lost = received_then_lost(redis_server)
    lose_it_as_celery_does(lost)
    redis_server.start()

    fresh = Connection(redis_server.url, transport_options={"socket_timeout": SOCKET_TIMEOUT})
    try:
        queue = Queue("tasks", Exchange("stale", type="direct"), "tasks")
        with fresh.Producer() as producer:
            producer.publish(
                {"n": 2}, exchange=queue.exchange, routing_key="tasks", declare=[queue]
            )
        received: list[Message] = []
        fresh.Consumer([queue], callbacks=[lambda _, message: received.append(message)]).consume()
        fresh.drain_events(timeout=10)
        assert [message.payload for message in received] == [{"n": 2}]
        received[0].ack()
        assert received[0].acknowledged
        client = redis_server.client()
        assert client.hlen("unacked") == 0  # type: ignore[attr-defined]
    finally:
        fresh.release()


def test_install_wraps_once() -> None:
    stale_channel.install()
    wrapped = kombu_redis.Channel._connparams
    stale_channel.install()
    assert kombu_redis.Channel._connparams is wrapped
    assert not getattr(wrapped.__wrapped__, "_sessions_detached_guard", False)


def test_the_workers_app_installs_it() -> None:
    import sessions.worker.celery_app  # noqa: F401  (importing the app is what a worker and a tracker do)

    assert stale_channel.installed()
