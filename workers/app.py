"""The Celery app, and the process signals that keep the store healthy around it.

A worker and beat migrate the database once at start, so a worker pointed at an empty
database just works: the worker in ``celeryd_after_setup`` (like ``worker_init`` it runs in the
main process before the pool forks and before anything is consumed, but after logging is set
up, so the outcome is in the worker's log), beat in ``beat_init``. ``worker_process_init``
drops the connection pool a prefork child inherits from its parent (shared sockets break both
ends).

Before any connection is made, :mod:`workers.stale_channel` makes a Redis channel whose broker
connection is gone fail with a connection error instead of killing the worker (Celery 5.7 with
kombu's Redis transport, after a broker restart).

Metrics (:mod:`workers.metrics`) start in the main process with the worker, before the pool
forks (so pool processes inherit multiprocess mode); a pool process lets go of the endpoint's
socket when it starts and does prometheus-client's bookkeeping for a dead process when it
exits; the main process closes the endpoint at shutdown.
"""

from __future__ import annotations

import logging
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
from sqlalchemy.exc import SQLAlchemyError

from sessions.errors import StoreUnavailableError
from sessions.settings import Settings, get_settings, mask_url
from sessions.store import SessionStore
from workers import metrics, stale_channel

log = logging.getLogger(__name__)

#: Attempts at the start-up migration; a worker and beat starting together on an empty
#: database race to create the schema, and the loser finds it done on its next attempt.
MIGRATION_ATTEMPTS = 3


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured by ``celeryconfig``, or for other ``settings`` (its broker).

    The process-wide :data:`app` reads the environment; a client with settings of its own
    (a test, the demo) gets an app of its own that publishes to the broker they name.
    """
    import celeryconfig

    own = Celery("sessions", include=["workers.tasks"], set_as_current=settings is None)
    own.config_from_object("celeryconfig")
    if settings is not None:
        own.conf.update(celeryconfig.from_settings(settings))
        celeryconfig.prepare_broker(settings)
    return own


stale_channel.install()
app = create_app()


def migrate_store(settings: Settings | None = None) -> None:
    """Bring the schema to the newest revision; log (not raise) when the database is away.

    A worker that starts while the database is down keeps running: ingest retries with
    backoff until the database is back (and then migrates it on first use).
    """
    settings = settings or get_settings()
    for attempt in range(1, MIGRATION_ATTEMPTS + 1):
        store = SessionStore(settings.database_url, settings=settings)
        try:
            store.upgrade()
            log.info("database at %s is at the newest schema", mask_url(settings.database_url))
            return
        except StoreUnavailableError as exc:
            log.error("cannot migrate at start, tasks will retry until it is back: %s", exc)
            return
        except SQLAlchemyError as exc:
            if attempt == MIGRATION_ATTEMPTS:
                raise
            log.info("schema upgrade raced another process (%s); trying again", exc)
            time.sleep(0.5 * attempt)
        finally:
            store.dispose()


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _prepare_worker(**_: Any) -> None:
    _prepare()
    metrics.start(get_settings())


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_worker(**_: Any) -> None:
    metrics.stop()


@beat_init.connect  # type: ignore[untyped-decorator]
def _prepare_beat(**_: Any) -> None:
    _prepare()


def _prepare() -> None:
    import celeryconfig

    settings = get_settings()
    celeryconfig.prepare_broker(settings)
    migrate_store(settings)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _forget_inherited_state(**_: Any) -> None:
    from workers.tasks import reset_store_after_fork

    reset_store_after_fork()
    metrics.after_fork()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _pool_process_exits(**_: Any) -> None:
    metrics.process_exit()
