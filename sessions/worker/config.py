"""Celery configuration of the session pipeline, read by the worker's app
(:func:`sessions.worker.celery_app.create_app`); a checkout's top-level ``celeryconfig.py``
re-exports it for ``app.config_from_object("celeryconfig")``.

Everything that varies between deployments (broker, intervals, thresholds) comes from
:class:`sessions.settings.Settings`, i.e. from ``SESSIONS_*`` environment variables; the rest
is the pipeline's contract with Celery and is fixed here on purpose. What every app publishing
to the pipeline must agree on (broker, transport options, serializer, queues, routes) is said
once, in :mod:`sessions.broker`, which the agents' own small Celery app uses too; the names
below that come from there are kept importable from here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sessions.broker import AMQP_CONFIRM_TIMEOUT as AMQP_CONFIRM_TIMEOUT
from sessions.broker import AMQP_DELIVERY_LIMIT as AMQP_DELIVERY_LIMIT
from sessions.broker import AMQP_QUEUE_ARGUMENTS as AMQP_QUEUE_ARGUMENTS
from sessions.broker import EVENTS_QUEUE as EVENTS_QUEUE
from sessions.broker import EXCHANGE as EXCHANGE
from sessions.broker import FILESYSTEM_TRANSPORT as FILESYSTEM_TRANSPORT
from sessions.broker import MAINTENANCE_QUEUE as MAINTENANCE_QUEUE
from sessions.broker import PUBLISH_RETRY_POLICY as PUBLISH_RETRY_POLICY
from sessions.broker import REDIS_SOCKET_TIMEOUT as REDIS_SOCKET_TIMEOUT
from sessions.broker import delivers_without_polling, publishing_config
from sessions.broker import prepare_broker as prepare_broker
from sessions.broker import task_queues_for as task_queues_for
from sessions.broker import transport_options as transport_options
from sessions.settings import Settings, get_settings


def beat_schedule_for(settings: Settings) -> dict[str, dict[str, Any]]:
    """The housekeeping sweeps, every interval and threshold from ``settings``.

    A sweep message expires after one interval: when workers were away, the next run does
    the same work, so a backlog of identical sweeps is dropped instead of run in a row.
    """
    return {
        "expire-idle-sessions": {
            "task": "sessions.expire_idle",
            "schedule": timedelta(seconds=settings.idle_sweep_interval),
            "options": {"expires": settings.idle_sweep_interval},
            "kwargs": {"max_idle_seconds": settings.max_idle_seconds},
        },
        "expire-old-sessions": {
            "task": "sessions.expire_older_than",
            "schedule": timedelta(seconds=settings.age_sweep_interval),
            "options": {"expires": settings.age_sweep_interval},
            "kwargs": {"max_age_days": settings.max_age_days},
        },
        "sweep-session-health": {
            "task": "sessions.sweep_health",
            "schedule": timedelta(seconds=settings.health_sweep_interval),
            "options": {"expires": settings.health_sweep_interval},
            "kwargs": {
                "warn_rate": settings.health_warn_rate,
                "fail_rate": settings.health_fail_rate,
                "min_requests": settings.health_min_requests,
            },
        },
        "purge-old-data": {
            "task": "sessions.purge",
            "schedule": timedelta(seconds=settings.purge_interval),
            "options": {"expires": settings.purge_interval},
        },
    }


#: Messages a pool process reserves ahead of the one it runs, unless
#: ``SESSIONS_WORKER_PREFETCH_MULTIPLIER`` says otherwise: on a broker that delivers without
#: polling, and on one that is polled.
DELIVERED_PREFETCH_MULTIPLIER = 1
POLLED_PREFETCH_MULTIPLIER = 4


def prefetch_multiplier(settings: Settings) -> int:
    """How many messages each pool process reserves ahead (Celery's ``worker_prefetch_multiplier``).

    Each message carries up to ``batch_max_events`` events (5000 by default), and every
    message reserved waits in the main process, decoded, until a pool process takes it. On
    Redis and RabbitMQ one is enough: the consumer asks for the next message the moment a
    pool process acknowledges one (Redis's ``BRPOP`` is registered again on the next turn
    of the event loop; RabbitMQ sends it at once), so a pool process waits a round trip
    between batches that take tens of milliseconds. Measured (README, Performance, item 10):
    the same throughput and event-to-commit latency as 4, and 14 MB less of the worker's
    memory at batches of 5000. It also bounds what a killed worker holds: on Redis its
    unacknowledged messages wait a visibility timeout before another worker sees them,
    two batches instead of eight with two pool processes. On RabbitMQ (quorum queues,
    per-consumer QoS) the multiplier times the concurrency is the consumer's prefetch count.

    A polled broker (the filesystem one) is different: once a consumer's reservations are
    full, kombu's virtual transport does not look again for ``broker_polling_interval``
    (kombu 5.7.0, ``virtual.Channel.drain_events`` raises ``Empty`` and
    ``virtual.Transport.drain_events`` sleeps), so with one message per process a pool
    process that finishes waits up to a poll for its next; four keep a backlog there.
    """
    if settings.worker_prefetch_multiplier is not None:
        return settings.worker_prefetch_multiplier
    if delivers_without_polling(settings):
        return DELIVERED_PREFETCH_MULTIPLIER
    return POLLED_PREFETCH_MULTIPLIER


def from_settings(settings: Settings) -> dict[str, Any]:
    """The part of this configuration that comes from ``settings``: what publishing needs
    (:func:`sessions.broker.publishing_config`) and the worker's prefetch and beat schedule.

    The module's own values below are this applied to :func:`get_settings`; a worker app with
    other settings (a test, the demo) applies it to its own app.
    """
    return {
        **publishing_config(settings),
        "worker_prefetch_multiplier": prefetch_multiplier(settings),
        "beat_schedule": beat_schedule_for(settings),
    }


# -- what comes from the settings: broker, messages, queues and routes (sessions.broker), the
# worker's prefetch, the beat schedule. Set as this module's names, where Celery reads them.
globals().update(from_settings(get_settings()))

# -- broker -----------------------------------------------------------------------------------
broker_connection_retry_on_startup = True
# Reconnect to a lost broker for as long as it takes (None: no limit). Celery's default, 100
# attempts at kombu's 2, 4, ... 30 s spacing, gives up after some 47 minutes of outage and
# the worker exits ("Unrecoverable error"): only a supervisor would bring it back.
broker_connection_max_retries = None

# -- messages ---------------------------------------------------------------------------------
event_serializer = "json"
# The queues of RabbitMQ's native delayed delivery (countdowns, see task_queues_for) are
# quorum queues like the pipeline's, so a retry waiting for its countdown survives a crash.
broker_native_delayed_delivery_queue_type = "quorum"

# -- delivery: at least once; the store's ledger makes it exactly once in effect -------------
# Acknowledge after the batch is committed, and put the message back when a prefork child is
# killed mid-task (acks_late alone acknowledges it then, and the batch is lost).
task_acks_late = True
task_reject_on_worker_lost = True

# -- beat -------------------------------------------------------------------------------------
timezone = "UTC"
enable_utc = True

# -- worker -----------------------------------------------------------------------------------
# The pool is Celery's default, prefork (a process per core): a task that kills its process
# takes only that pool process, and its message comes back at once (task_reject_on_worker_lost).
# `--pool threads -c 2` takes less memory at the same throughput (README, Performance,
# bench/worker_memory.py); it is not set here because a configured worker_pool also overrides
# an explicit `--pool=prefork` on the command line (Celery reads "prefork" there as "not
# given").
# A safety net, not a budget: a pool process whose RSS (inherited pages included) has grown
# past this many KiB is replaced once its task is done, so that a leak or one outsized batch
# does not keep its memory for the worker's lifetime. Well above what a pool process holds
# (README, Performance); `--max-memory-per-child` on the command line takes precedence.
worker_max_memory_per_child = 256 * 1024
# A worker is a process of its own: let Celery configure its root logger, so the store's
# ``sessions.*`` loggers (dead letters, retried transactions) reach the worker's log.
worker_hijack_root_logger = True
worker_send_task_events = False
# Celery's consumer, refusing (logged, counted) a task message whose headers or body it would
# choke on in the main process, instead of exiting: see sessions/worker/consumer.py.
worker_consumer = "sessions.worker.consumer:Consumer"
# A task still running when the broker connection drops is redelivered (acks_late): cancel
# it rather than let it run alongside its redelivery (the ledger would drop one, but why work).
worker_cancel_long_running_tasks_on_connection_loss = True
