"""Handing a batch to the broker: the one place where ``sessions`` imports ``workers``.

A publisher is any callable that takes a batch's message (:meth:`Batch.to_message`) and
returns once the broker has it, or raises (:class:`~sessions.errors.UnserializableBatchError`
when the message itself cannot be encoded: then the broker is not to blame).
:class:`CeleryPublisher` is the real one: it sends the message as one JSON text
(:func:`sessions.events.encode_message`), which the worker validates in one call. Tests pass
a function instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic_core import PydanticSerializationError

from sessions.errors import UnserializableBatchError
from sessions.events import encode_message
from sessions.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

#: Name of the worker task that applies one batch.
INGEST_TASK = "sessions.ingest"

#: Publishes one batch message; raises when the broker did not take it.
Publisher = Callable[[dict[str, Any]], None]


class CeleryPublisher:
    """Sends each batch as one ``sessions.ingest`` message to the broker ``settings`` name.

    Making one imports Celery and configures an app (no connection yet: that happens on the
    first publish). Socket timeouts and a short retry policy come from ``celeryconfig``: a
    broker that is down fails a publish in seconds, never hangs it.
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self._app: Celery | None = None
        self._lock = threading.Lock()
        # Import Celery and make the app now, in the caller's thread: done later in the
        # tracker's background thread, the import would hold the GIL for tens of
        # milliseconds while the agent is recording.
        self._celery()

    def __call__(self, message: dict[str, Any]) -> None:
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
        confirms, see ``celeryconfig``); raises when it refused or did not confirm in
        ``AMQP_CONFIRM_TIMEOUT`` seconds, or when it cannot be reached; raises
        :class:`~sessions.errors.UnserializableBatchError` when kombu cannot encode ``text``
        (the message's fault, not the broker's: the tracker does not wait for the broker then).
        """
        from kombu.exceptions import EncodeError

        import celeryconfig

        try:
            self._celery().send_task(
                INGEST_TASK,
                args=[text],
                task_id=task_id,
                confirm_timeout=celeryconfig.AMQP_CONFIRM_TIMEOUT,
            )
        except EncodeError as exc:
            raise UnserializableBatchError(f"the broker client cannot encode it: {exc}") from exc

    def queued_messages(self) -> int:
        """Messages waiting in the ingest queue, taken by no worker yet (raises when the broker
        cannot say).

        The tracker asks before it republishes a batch the ledger lacks: while workers have a
        backlog, a missing batch is most likely just waiting in it.
        """
        import celeryconfig

        # A connection of its own, closed afterwards: on RabbitMQ a passive declare of a queue
        # that does not exist is answered by closing the channel (404 NOT_FOUND), which must
        # not be a channel the publisher goes on using.
        with self._celery().connection_for_read() as connection:
            try:
                declared = connection.default_channel.queue_declare(
                    queue=celeryconfig.EVENTS_QUEUE, passive=True
                )
            except connection.channel_errors:  # NOT_FOUND: no queue yet (Redis keeps no empty list)
                return 0
        # On RabbitMQ the count is of ready messages: those delivered to a worker and not yet
        # acknowledged are not in it, as on Redis.
        return int(declared.message_count)

    def _celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                from workers.app import create_app

                self._app = create_app(self.settings)
            return self._app

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's app and connections without closing them."""
        self._app = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the broker connections (a later publish opens new ones)."""
        with self._lock:
            app, self._app = self._app, None
        if app is not None:
            app.close()
