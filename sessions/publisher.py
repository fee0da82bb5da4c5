"""Handing a batch to the broker: the :class:`Publisher` protocol and its Celery implementation.

A publisher takes a batch's wire text (:func:`sessions.plain.batch_json`, the JSON the worker
validates in one call) and returns once the broker has it, or raises:
:class:`~sessions.errors.UnserializableBatchError` when the message itself cannot be encoded
(then the broker is not to blame, and the tracker neither retries nor spools it), anything
else when the broker did not take it. It also says how many messages wait in the ingest queue
(the tracker holds back republishing while workers have a backlog), and lets go of its
connections at close and after a fork.

:class:`CeleryPublisher` is the real one: it publishes Celery task messages through kombu. A
plain function taking the batch message as a dict
(what tests and earlier releases pass) is wrapped in a :class:`CallablePublisher` by
:func:`as_publisher`; :mod:`sessions.testing` has an in-memory one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sessions.broker import (
    AMQP_CONFIRM_TIMEOUT,
    EVENTS_QUEUE,
    PUBLISH_RETRY_POLICY,
    broker_connection,
    events_route,
)
from sessions.client_settings import ClientSettings
from sessions.errors import UnserializableBatchError, first_line

if TYPE_CHECKING:
    from kombu.connection import Connection
    from kombu.messaging import Producer

#: Name of the worker task that applies one batch.
INGEST_TASK = "sessions.ingest"

#: A function that publishes one batch message (the dict of :meth:`Batch.to_message`) and
#: raises when the broker did not take it: the simplest publisher, for tests.
MessageFunction = Callable[[dict[str, Any]], None]


@runtime_checkable
class Publisher(Protocol):
    """What the tracker publishes through (a :func:`typing.runtime_checkable` protocol).

    Only :meth:`publish_text` must be written: a class that subclasses this protocol
    explicitly inherits the other three, which say "cannot tell" and do nothing.
    """

    def publish_text(self, text: str) -> None:
        """Hand one batch's wire text to the broker; return once the broker has it.

        :raises UnserializableBatchError: ``text`` cannot be encoded for the broker (the
            batch's fault: it is set aside, not retried).
        :raises Exception: anything else means the broker did not take it (retried, then
            spooled).
        """

    def queued_messages(self) -> int | None:
        """Messages waiting in the ingest queue, taken by no worker yet; ``None`` when this
        publisher cannot tell (the tracker's backlog guard is then off).

        :raises Exception: the broker cannot say now (the tracker counts that as a backlog).
        """
        return None

    def close(self) -> None:
        """Let go of broker connections (a later publish may open new ones)."""
        return None

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them (they
        are the parent's sockets)."""
        return None


class CallablePublisher(Publisher):
    """A :class:`Publisher` around a function that takes the batch message as a dict."""

    def __init__(self, publish: MessageFunction) -> None:
        self.publish = publish

    def publish_text(self, text: str) -> None:
        self.publish(message_of(text))


def as_publisher(publisher: Publisher | MessageFunction) -> Publisher:
    """``publisher`` as a :class:`Publisher`: itself, or a function wrapped in a
    :class:`CallablePublisher`.

    :raises TypeError: ``publisher`` is neither, or is half a :class:`Publisher` (it has
        ``publish_text`` or ``queued_messages`` but not all four methods: wrapped as a plain
        function, what it has would be silently ignored).
    """
    if isinstance(publisher, Publisher):
        return publisher
    members = ("publish_text", "queued_messages", "close", "after_fork")
    partial = [name for name in members[:2] if hasattr(publisher, name)]
    if partial or not callable(publisher):
        missing = [name for name in members if not hasattr(publisher, name)]
        raise TypeError(
            f"publisher: must be a sessions.publisher.Publisher (publish_text, queued_messages, "
            f"close, after_fork; subclass it for the defaults) or a function taking a batch "
            f"message; {type(publisher).__name__} lacks {', '.join(missing)}"
        )
    return CallablePublisher(publisher)


def message_of(text: str) -> dict[str, Any]:
    """The batch message a wire text holds, for a publisher that takes dicts.

    :raises UnserializableBatchError: ``text`` is not a JSON object.
    """
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UnserializableBatchError(f"not a JSON document: {first_line(exc)}") from exc
    if not isinstance(message, dict):
        raise UnserializableBatchError(f"not a JSON object but {type(message).__name__}")
    return message


#: The embedded-options part of a Celery protocol-2 body: a batch has no callbacks, no chain.
_NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(text: str, task_id: str, origin: str) -> tuple[list[Any], dict[str, Any]]:
    """The body and headers of the ``sessions.ingest`` task message carrying ``text``.

    Celery's task message, protocol 2, with the headers Celery 5's ``send_task`` gives a task
    with no ETA, expiry, time limit, group or parent (``celery.app.amqp.AMQP.as_task_v2``;
    ``tests/integration/test_publisher_queue.py`` compares the two). Two differ on purpose:
    ``argsrepr`` is short (Celery's is a 1 KiB ``saferepr`` of the batch, which only its logs
    would show), and the message's ``reply_to`` property is empty (Celery's names the app's
    result queue; nobody reads ingest's results).
    """
    headers: dict[str, Any] = {
        "lang": "py",
        "task": INGEST_TASK,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": f"(<batch, {len(text)} characters>,)",
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    return [[text], {}, _NO_CANVAS], headers


class CeleryPublisher(Publisher):
    """Sends each batch as one ``sessions.ingest`` task message to the broker ``settings`` names.

    The message is the one Celery's ``send_task`` would send (:func:`task_message`), published
    through kombu as Celery publishes it: same connection settings and routing
    (:func:`sessions.broker.broker_connection`, :func:`~sessions.broker.events_route`), JSON,
    persistent, the queue declared, the short retry policy, and on RabbitMQ a publisher confirm
    awaited. Celery itself is never imported: making and configuring a Celery app cost an
    agent more start-up time than the rest of the client (``bench/client_start.py``). Socket
    timeouts and the retry policy make a broker that is down fail a publish in seconds, never
    hang it: a refused connection in about half a second, a broker that accepts and then
    stops answering in three attempts of a socket timeout each (about 8 s on Redis; on
    RabbitMQ about 11 s with the confirm timeout), as Celery's own ``send_task`` does. One
    connection, opened on the first publish and dropped after a failed one (the next publish
    opens a new one); thread-safe.
    """

    def __init__(self, settings: ClientSettings | None = None):
        self.settings = settings or ClientSettings.from_environment()
        self._queue, self._exchange = events_route(self.settings)
        # Celery's default origin of a message, ``gen<pid>@<host>``, made at fork time too.
        self._origin = ""
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self.after_fork()

    def __call__(self, message: dict[str, Any]) -> None:
        """Publish a batch message given as a dict (encoded as :meth:`publish_text` takes it).

        :raises UnserializableBatchError: the message cannot be serialised.
        """
        from pydantic_core import PydanticSerializationError

        from sessions.events import encode_message

        try:
            text = encode_message(message)
        except PydanticSerializationError as exc:
            raise UnserializableBatchError(f"batch cannot be serialised: {exc}") from exc
        self.publish_text(text)

    def publish_text(self, text: str) -> None:
        """Send a batch's wire form, one JSON text (see :func:`sessions.events.encode_message`).

        The tracker hands over text it made straight from its buffer, without a dict between.
        """
        self.send(text)

    def send(self, text: str, task_id: str | None = None) -> None:
        """Publish ``text`` as one ``sessions.ingest`` message (under ``task_id``, if given).

        Returns once the broker has it: on RabbitMQ, once it confirmed the message (publisher
        confirms, see :func:`sessions.broker.transport_options`); raises when it refused or did
        not confirm in ``AMQP_CONFIRM_TIMEOUT`` seconds, or when it cannot be reached; raises
        :class:`~sessions.errors.UnserializableBatchError` when kombu cannot encode ``text``
        (the message's fault, not the broker's: the tracker does not wait for the broker then).
        """
        from kombu.exceptions import EncodeError

        task_id = task_id or str(uuid.uuid4())
        body, headers = task_message(text, task_id, self._origin)
        with self._lock:
            producer = self._producer_now()
            try:
                producer.publish(  # type: ignore[no-untyped-call]
                    body,
                    exchange=self._exchange,
                    routing_key=EVENTS_QUEUE,
                    serializer="json",
                    retry=True,
                    retry_policy=PUBLISH_RETRY_POLICY,
                    delivery_mode="persistent",
                    declare=[self._queue],
                    headers=headers,
                    confirm_timeout=AMQP_CONFIRM_TIMEOUT,
                    correlation_id=task_id,
                    reply_to="",
                )
            except EncodeError as exc:
                raise UnserializableBatchError(
                    f"the broker client cannot encode it: {exc}"
                ) from exc
            except BaseException:
                # The connection may be half-broken (a timed-out confirm, a reset socket):
                # the next publish starts from a new one, as a connection pool would.
                self._drop_connection()
                raise

    def queued_messages(self) -> int:
        """Messages waiting in the ingest queue, taken by no worker yet (raises when the broker
        cannot say).

        The tracker asks before it republishes a batch the ledger lacks: while workers have a
        backlog, a missing batch is most likely just waiting in it.
        """
        # A connection of its own, closed afterwards: on RabbitMQ a passive declare of a queue
        # that does not exist is answered by closing the channel (404 NOT_FOUND), which must
        # not be a channel the publisher goes on using.
        with broker_connection(self.settings) as connection:
            try:
                declared = connection.default_channel.queue_declare(
                    queue=EVENTS_QUEUE, passive=True
                )
            except connection.channel_errors:  # NOT_FOUND: no queue yet (Redis keeps no empty list)
                return 0
        # On RabbitMQ the count is of ready messages: those delivered to a worker and not yet
        # acknowledged are not in it, as on Redis.
        return int(declared.message_count)

    def _producer_now(self) -> Producer:
        """The producer on the open connection, opening one if there is none (under the lock)."""
        if self._producer is None:
            from kombu.messaging import Producer

            self._connection = broker_connection(self.settings)
            self._producer = Producer(self._connection)  # type: ignore[no-untyped-call]
        return self._producer

    def _drop_connection(self, graceful: bool = False) -> None:
        """Let go of the connection, ignoring what a broken one raises (under the lock).

        A RabbitMQ node that blocks publishers (a memory or disk alarm) stops reading their
        sockets, so py-amqp's closing handshake (``Channel.close``, ``Connection.close``)
        would wait for a ``Close-Ok`` that never comes, with this lock held: the publisher
        thread hung until the alarm cleared, and the tracker's ``close`` gave up on it with
        the buffered events neither published nor spooled. So after a failed publish the
        socket is closed without the handshake (kombu's ``collect``), and with a timeout set
        first (on ``amqps://`` closing the socket is a TLS shutdown, which waits for the peer
        too). The tracker keeps the batch it could not confirm; the node may still read the
        publish left in the socket once the alarm clears, a copy under the same batch id,
        which the ledger drops. ``graceful`` (a normal close) says goodbye, waiting at most
        :data:`AMQP_CONFIRM_TIMEOUT` for each of its two answers (channel, connection).
        """
        connection, self._connection, self._producer = self._connection, None, None
        if connection is None:
            return
        # It is being thrown away: what a broken connection raises changes nothing.
        with contextlib.suppress(Exception):
            if connection.transport.driver_type != "amqp":
                connection.close()  # type: ignore[no-untyped-call]  # nothing to wait for
                return
            # py-amqp waits on its socket's own timeout when it is given none.
            raw = getattr(connection, "_connection", None)
            sock = getattr(getattr(raw, "transport", None), "sock", None)
            if sock is not None:
                sock.settimeout(AMQP_CONFIRM_TIMEOUT)
            if graceful:
                try:
                    connection.close()  # type: ignore[no-untyped-call]
                    return
                except Exception:
                    pass  # not answered in time: drop it as below
            connection.collect()  # type: ignore[no-untyped-call]

    def after_fork(self) -> None:
        """In a forked child: drop the parent's connection without closing it (its socket is
        the parent's), and take this process's id as the messages' origin."""
        self._connection = self._producer = None
        self._lock = threading.Lock()
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"

    def close(self) -> None:
        """Close the broker connection (a later publish opens a new one)."""
        with self._lock:
            self._drop_connection(graceful=True)
