"""The Celery app, and the process signals that keep the store healthy around it.

A worker and beat migrate the database once at start, so a worker pointed at an empty
database just works, and refuse to start (exit status 78, ``EX_CONFIG``) on a database that
answers but cannot be used: a dialect the store does not support, a schema that is not at
the newest revision after the upgrade. A database that does not answer is waited for. The
worker in ``celeryd_after_setup`` (like ``worker_init`` it runs in the
main process before the pool forks and before anything is consumed, but after logging is set
up, so the outcome is in the worker's log), beat in ``beat_init``. ``worker_process_init``
drops the connection pool a prefork child inherits from its parent (shared sockets break both
ends).

Before any connection is made, :mod:`sessions.worker.stale_channel` makes a Redis channel whose
broker connection is gone fail with a connection error instead of killing the worker (Celery 5.7
with kombu's Redis transport, after a broker restart), and :mod:`sessions.worker.envelopes` makes
a queue item that is not a kombu message (Redis, filesystem broker) a ``sessions.set_aside`` task
instead of a crash. A task message that kombu reads but Celery would choke on is refused by the
worker's consumer (:mod:`sessions.worker.consumer`, configured in :mod:`sessions.worker.config`).

Metrics (:mod:`sessions.worker.metrics`) start in the main process with the worker, before the pool
forks (so pool processes inherit multiprocess mode); a pool process lets go of the endpoint's
socket when it starts and does prometheus-client's bookkeeping for a dead process when it
exits; the main process closes the endpoint at shutdown.

Once the main process is set up, and before the pool forks, every object it holds is frozen
out of the garbage collector's reach (:mod:`sessions.worker.sharing`), so that pool processes
keep sharing the pages they inherit instead of copying them.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery
from celery.signals import (
    beat_init,
    celeryd_after_setup,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from sessions.database import HEAD_REVISIONS, at_head_revisions, require_head, upgrade_schema
from sessions.errors import (
    SchemaNotAtHeadError,
    StoreUnavailableError,
    StoreUnusableError,
    first_line,
)
from sessions.settings import Settings, get_settings, mask_url
from sessions.worker import config, envelopes, metrics, sharing, stale_channel

log = logging.getLogger(__name__)

#: Attempts at the start-up migration; a worker and beat starting together on an empty
#: database race to create the schema, and the loser finds it done on its next attempt.
MIGRATION_ATTEMPTS = 3
#: Exit status of a worker or beat that refuses to start on a database it cannot use
#: (``EX_CONFIG`` of sysexits.h: a supervisor should not restart it until someone fixes it).
REFUSED_EXIT_CODE = os.EX_CONFIG


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured by :mod:`sessions.worker.config`, or for other ``settings``
    (its broker).

    The process-wide :data:`app` reads the environment; a client with settings of its own
    (a test, the demo) gets an app of its own that publishes to the broker they name.
    """
    from sessions.worker import config

    own = Celery("sessions", include=["sessions.worker.tasks"], set_as_current=settings is None)
    own.config_from_object(config)
    if settings is not None:
        own.conf.update(config.from_settings(settings))
        config.prepare_broker(settings)
    return own


#: The task an unreadable queue item becomes (``sessions.worker.tasks.set_aside``).
SET_ASIDE_TASK = "sessions.set_aside"


def _install_envelope_guard(celery: Celery) -> None:
    """:func:`envelopes.install`: an unreadable item of the pipeline's queues is set aside as
    a :data:`SET_ASIDE_TASK`; one of another queue is dropped, and counted."""
    set_aside = envelopes.set_aside_as_task(
        celery, SET_ASIDE_TASK, (config.EVENTS_QUEUE, config.MAINTENANCE_QUEUE)
    )

    def replace(text: str, reason: str, queue: str) -> dict[str, Any] | None:
        replacement = set_aside(text, reason, queue)
        if replacement is None:
            metrics.record_refusal("unreadable_envelope")
        return replacement

    envelopes.install(replace)


stale_channel.install()
app = create_app()
_install_envelope_guard(app)

#: Whether this process, or the one it was forked from, found the schema at the newest revision.
_schema_ready = False


def ensure_schema(settings: Settings | None = None) -> None:
    """:func:`migrate_store` once: at start, or at first use if the database was away then.

    Raises what :func:`migrate_store` raises.
    """
    global _schema_ready
    if not _schema_ready:
        _schema_ready = migrate_store(settings)


def migrate_store(settings: Settings | None = None) -> bool:
    """Bring the schema to the newest revision; ``False`` (logged) if the database is away.

    A worker that starts while the database is down keeps running: ingest retries with
    backoff until the database is back. A database that answers but cannot be used is
    another matter: raises :class:`~sessions.errors.StoreUnusableError` (a dialect the store
    does not support, a schema still not at the newest revision after
    :data:`MIGRATION_ATTEMPTS` upgrades, each failure logged) naming the masked URL.
    """
    settings = settings or get_settings()
    url = settings.database_url
    try:
        at_head = at_head_revisions(url)
    except StoreUnavailableError as exc:
        log.error("cannot migrate now, tasks will retry until it is back: %s", exc)
        return False
    if at_head:  # the usual start: nothing to do, and no Alembic to import
        revision = ", ".join(sorted(HEAD_REVISIONS))
        log.info("database at %s is at the newest schema (%s)", mask_url(url), revision)
        return True
    for attempt in range(1, MIGRATION_ATTEMPTS + 1):
        failure: Exception | None = None
        try:
            upgrade_schema(url)
        except StoreUnavailableError as exc:
            log.error("cannot migrate now, tasks will retry until it is back: %s", exc)
            return False
        except StoreUnusableError:
            raise
        except Exception as exc:  # an SQLAlchemy or Alembic error: maybe a race, maybe not
            failure = exc
        try:  # after a failure too: another process migrating at the same time may be done
            revision = require_head(url)
        except SchemaNotAtHeadError as exc:
            why = f"; upgrading it failed: {first_line(failure)}" if failure else ""
            if attempt == MIGRATION_ATTEMPTS:
                raise SchemaNotAtHeadError(f"{exc}{why}") from failure
            log.warning(
                "%s (attempt %d of %d); trying again", f"{exc}{why}", attempt, MIGRATION_ATTEMPTS
            )
            time.sleep(0.5 * attempt)
            continue
        log.info("database at %s is at the newest schema (%s)", mask_url(url), revision)
        return True
    raise AssertionError("unreachable")  # pragma: no cover


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _prepare_worker(**_: Any) -> None:
    _prepare()
    metrics.start(get_settings())
    # Last, in the main process, before the pool forks: see sessions/worker/sharing.py.
    sharing.freeze_before_fork()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_worker(**_: Any) -> None:
    metrics.stop()


@beat_init.connect  # type: ignore[untyped-decorator]
def _prepare_beat(**_: Any) -> None:
    _prepare()


def _prepare() -> None:
    settings = get_settings()
    config.prepare_broker(settings)
    try:
        ensure_schema(settings)
    except StoreUnusableError as exc:
        # Celery logs and ignores an exception a signal handler raises, and would go on to
        # consume on a database it cannot write to; SystemExit is not caught, and nothing
        # has been started yet (no pool, no broker connection) that would need stopping.
        log.critical("refusing to start: %s", exc)
        raise SystemExit(REFUSED_EXIT_CODE) from None


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _forget_inherited_state(**_: Any) -> None:
    from sessions.worker.tasks import reset_store_after_fork

    reset_store_after_fork()
    metrics.after_fork()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _pool_process_exits(**_: Any) -> None:
    metrics.process_exit()
