"""The pipeline's broker, as everything that publishes to it must see it: said once.

The worker's app (:mod:`sessions.worker.config`, :func:`sessions.worker.celery_app.create_app`)
takes its broker URL, transport and its options, serializer, publish retries, delivery mode,
queues, exchange and routes from :func:`publishing_config`. The client publishes through kombu
alone (:class:`~sessions.publisher.CeleryPublisher`: importing and configuring Celery would cost
an agent's start-up more than everything else it does), from the same pieces:
:func:`broker_connection` and :func:`events_route`. So a client never imports the worker (its
signal handlers, its metrics, its configuration, the store), and still declares the queue
exactly as the worker does: RabbitMQ refuses to redeclare a queue with other arguments, and a
message routed to a queue nobody declared is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kombu.entity import Exchange, Queue

from sessions.client_settings import ClientSettings

if TYPE_CHECKING:
    from kombu.connection import Connection

#: Queue of ``sessions.ingest``: one message per batch of events.
EVENTS_QUEUE = "sessions.events"
#: Queue of the beat-driven sweeps, so housekeeping never waits behind a backlog of events.
MAINTENANCE_QUEUE = "sessions.maintenance"
#: The transport of a ``filesystem://`` broker (:mod:`sessions.filesystem_broker`).
FILESYSTEM_TRANSPORT = "sessions.filesystem_broker:Transport"
#: The exchange both queues are bound to, each under its own name as routing key.
EXCHANGE = "sessions"
#: Seconds a Redis socket may wait to connect or for a reply before the publish fails.
REDIS_SOCKET_TIMEOUT = 2.0
#: Seconds a publish on RabbitMQ waits for the broker's confirm before it counts as failed
#: (the tracker then spools the batch; if the broker did take it, the ledger drops the copy).
AMQP_CONFIRM_TIMEOUT = 5.0
#: Returns of one message a quorum queue allows before it drops it: far more than any batch
#: meets (the ledger and max_redeliveries end a batch long before), but never the default.
#: Since RabbitMQ 4.0 a quorum queue drops a message returned more than 20 times, and a batch
#: rejected back to the queue while its dead letter cannot be written (sessions.worker.tasks) comes
#: back every few seconds until the database is repaired. Not -1: RabbitMQ 3.x reads that as
#: "drop on the first return" (measured on 3.10.8).
AMQP_DELIVERY_LIMIT = 1_000_000
#: Arguments of the pipeline's queues on RabbitMQ (why quorum: see :func:`task_queues_for`).
AMQP_QUEUE_ARGUMENTS = {"x-queue-type": "quorum", "x-delivery-limit": AMQP_DELIVERY_LIMIT}
#: Short, bounded publish retries: a refusing broker fails a publish in about half a second.
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.1,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


def transport_options(settings: ClientSettings) -> dict[str, Any]:
    """``broker_transport_options`` for the broker ``settings`` names."""
    if _is_filesystem(settings):
        folders = _broker_folders(settings)
        return {
            # Producers write where consumers read: one folder serves both directions.
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            # The transport polls its folder; the default 1 s drains ~20 messages/s.
            "polling_interval": settings.broker_polling_interval,
        }
    if settings.uses_redis:
        return {
            # Without socket timeouts a Redis that accepts the connection but never answers
            # blocks a publish (and the agent's background thread) forever.
            "socket_timeout": REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": REDIS_SOCKET_TIMEOUT,
            # Reconnection attempts of one connection before the caller sees the error.
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
            # A message a worker has taken but not acknowledged comes back to the queue after
            # this long. With acks_late it must exceed the longest task run *and* the longest
            # retry countdown (ETA messages sit unacknowledged in the worker until they run):
            # ingest backs off at most sessions.worker.tasks.RETRY_BACKOFF_MAX (300 s), well
            # below the default hour. Too short is safe (the ledger drops the redelivered batch)
            # but wasteful.
            "visibility_timeout": settings.visibility_timeout_seconds,
            # Keep JSON bodies as they are: kombu's default base64 costs an encode in every
            # producer, a decode in the worker, and a third more bytes through Redis (twice:
            # the worker keeps each unacknowledged message in Redis too). Each message names
            # its own encoding, so messages sent either way are read by every worker.
            "body_encoding": "utf-8",
        }
    if _is_amqp(settings):
        return {
            # Publisher confirms on every channel (kombu passes these to amqp.Connection): a
            # publish returns only once RabbitMQ has taken the message, and for a persistent
            # message on a quorum queue that means written to disk by a majority of its
            # replicas. Without it a publish returns when the bytes are in the socket, and a
            # broker that dies then (or refuses the message) loses it with nobody told. The
            # price is a round trip per publish: one per batch, not per event.
            "confirm_publish": True,
        }
    return {"polling_interval": settings.broker_polling_interval}


def task_queues_for(settings: ClientSettings) -> tuple[Queue, ...]:
    """The pipeline's two queues on the broker ``settings`` names.

    On RabbitMQ they are **quorum queues** (durable, replicated by Raft, every message written
    to disk before it is confirmed), which Celery supports since 5.5 with two conditions, both
    met here:

    * no global QoS: Celery sees the queue type (``worker_detect_quorum_queues``) and sets the
      prefetch per consumer instead, ``worker_prefetch_multiplier`` x concurrency as before;
    * a countdown or ETA is not held in the worker (a quorum queue cannot raise a global
      prefetch to make room for it) but sent through RabbitMQ's *native delayed delivery*:
      Celery's ``celery_delayed_*`` exchanges and queues (quorum too, see
      ``broker_native_delayed_delivery_queue_type``), which the worker declares at start.
      Ingest retries a database outage with a countdown of up to 300 s, so this is needed;
      it works only through a topic (or fanout) exchange, hence ``topic`` on RabbitMQ. The
      routing keys are the queue names, so the topic exchange routes as the direct one does.

    Classic queues would also be durable, but a classic queue lives on one node, and an ETA
    message would sit unacknowledged in the worker for its countdown. An existing RabbitMQ
    deployment whose queues were declared classic, or whose ``sessions`` exchange was declared
    ``direct`` (this project's earlier releases), must delete them (drain the queues first)
    before these workers start: RabbitMQ refuses to redeclare a queue with other arguments or
    an exchange with another type (``PRECONDITION_FAILED``). On Redis and the filesystem
    broker a queue has no type: direct exchange.
    """
    if _is_amqp(settings):
        exchange = Exchange(EXCHANGE, type="topic")  # type: ignore[no-untyped-call]
        arguments: dict[str, Any] | None = AMQP_QUEUE_ARGUMENTS
    else:
        exchange = Exchange(EXCHANGE, type="direct")  # type: ignore[no-untyped-call]
        arguments = None
    return tuple(
        Queue(name, exchange, routing_key=name, queue_arguments=arguments)  # type: ignore[no-untyped-call]
        for name in (EVENTS_QUEUE, MAINTENANCE_QUEUE)
    )


def prepare_broker(settings: ClientSettings) -> None:
    """Create the filesystem broker's folders (kombu expects them); nothing for Redis."""
    if _is_filesystem(settings):
        for folder in _broker_folders(settings).values():
            folder.mkdir(parents=True, exist_ok=True)


def _broker_url(settings: ClientSettings) -> str:
    # kombu warns on every connection to a filesystem:// URL without a host; name it.
    if settings.broker_url in ("filesystem://", "filesystem:///"):
        return "filesystem://localhost//"
    return settings.broker_url


def _is_filesystem(settings: ClientSettings) -> bool:
    return settings.broker_url.startswith("filesystem:")


def _is_amqp(settings: ClientSettings) -> bool:
    return settings.broker_url.startswith(("amqp:", "amqps:", "pyamqp:"))


def delivers_without_polling(settings: ClientSettings) -> bool:
    """Whether the broker hands a consumer each message as it can take one (Redis's blocking
    ``BRPOP``, RabbitMQ's ``basic.consume``) rather than being polled (filesystem)."""
    return settings.uses_redis or _is_amqp(settings)


def _broker_folders(settings: ClientSettings) -> dict[str, Path]:
    root = settings.broker_dir.resolve()
    return {name: root / name for name in ("queue", "processed", "control")}


#: Where each task of the pipeline goes.
TASK_ROUTES = {
    "sessions.ingest": {"queue": EVENTS_QUEUE, "routing_key": EVENTS_QUEUE},
    "sessions.expire_idle": {"queue": MAINTENANCE_QUEUE, "routing_key": MAINTENANCE_QUEUE},
    "sessions.expire_older_than": {"queue": MAINTENANCE_QUEUE, "routing_key": MAINTENANCE_QUEUE},
    "sessions.sweep_health": {"queue": MAINTENANCE_QUEUE, "routing_key": MAINTENANCE_QUEUE},
    "sessions.purge": {"queue": MAINTENANCE_QUEUE, "routing_key": MAINTENANCE_QUEUE},
}


def publishing_config(settings: ClientSettings) -> dict[str, Any]:
    """The Celery settings of an app that publishes to the pipeline's broker ``settings`` name.

    The worker's app has these and the worker's own (:mod:`sessions.worker.config`). The
    client publishes with the same pieces through kombu (:func:`broker_connection`,
    :func:`events_route`); ``tests/integration/test_publisher_queue.py`` checks that its
    messages are those an app configured by this function sends.
    """
    return {
        # -- broker ---------------------------------------------------------------------------
        "broker_url": _broker_url(settings),
        # kombu's filesystem transport, except that a message file appears whole: with
        # kombu's own, a worker can read a file its producer has not written yet, and dies
        # (kombu #1551; see sessions/filesystem_broker.py). Other URLs pick their transport.
        "broker_transport": FILESYSTEM_TRANSPORT if _is_filesystem(settings) else None,
        "broker_transport_options": transport_options(settings),
        "broker_connection_timeout": REDIS_SOCKET_TIMEOUT,
        # -- messages: JSON only, never pickle --------------------------------------------------
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        # Messages survive a broker restart (Celery's default, stated because the pipeline
        # relies on it): on RabbitMQ, persistent messages in durable queues; Redis keeps what
        # it persists.
        "task_default_delivery_mode": "persistent",
        # Nobody reads task results: ingest's effect is the database, sweeps log what they
        # changed.
        "task_ignore_result": True,
        "result_backend": None,
        # -- queues and routes --------------------------------------------------------------
        "task_queues": task_queues_for(settings),
        "task_default_queue": EVENTS_QUEUE,
        "task_default_exchange": EXCHANGE,
        "task_default_exchange_type": "topic" if _is_amqp(settings) else "direct",
        "task_default_routing_key": EVENTS_QUEUE,
        "task_routes": TASK_ROUTES,
    }


def broker_connection(settings: ClientSettings) -> Connection:
    """A kombu connection to the broker ``settings`` names, with the transport, options and
    connect timeout :func:`publishing_config` gives the worker's app (not connected yet: kombu
    connects on first use). A filesystem broker's folders are made first.
    """
    from kombu.connection import Connection

    prepare_broker(settings)
    return Connection(  # type: ignore[no-untyped-call]
        _broker_url(settings),
        transport=FILESYSTEM_TRANSPORT if _is_filesystem(settings) else None,
        transport_options=transport_options(settings),
        connect_timeout=REDIS_SOCKET_TIMEOUT,
    )


def events_route(settings: ClientSettings) -> tuple[Queue, str]:
    """The ingest queue (to declare) and the exchange an ingest message is published to, with
    the queue's name as routing key, as Celery's ``send_task`` routes it by
    :data:`TASK_ROUTES`: the ``sessions`` topic exchange on RabbitMQ; elsewhere the default
    exchange (``""``), which is what Celery makes of a direct exchange's route.
    """
    queue = task_queues_for(settings)[0]
    return queue, EXCHANGE if _is_amqp(settings) else ""
