"""Confirmation on a Redis broker: workers mark settled batches there, agents read the marks.

An agent on Redis needs no database credentials to learn that its batches were applied. Once
a batch's transaction has committed (applied, a duplicate the ledger dropped, or set aside
whole: every way the ledger settles a batch id), the worker sets one key,
``sessions:applied:<batch_id>``, with a time to live (:class:`ConfirmationMarks`); the agent's
:class:`RedisConfirmer` asks for the keys of the batches it waits for, all in one round trip.

The ledger stays the truth; a mark is only a hint that can be missing, never wrong:

* it is written after the commit, so it never names a batch the ledger lacks;
* a worker that dies between the commit and the mark leaves the message unacknowledged: it
  comes back, the ledger drops it as a duplicate, and that time the mark is written;
* a mark lost with Redis (restarted empty) or expired before the agent looked makes the agent
  publish the batch again: the ledger drops the copy, and its worker writes the mark again.

The time to live (``ClientSettings.confirmation_ttl``, an hour by default) covers the time an agent
normally takes to look after the apply (seconds); one that looks later republishes once, a
copy the ledger drops and whose worker marks it again. Both sides connect with
redis-py straight from the broker URL (``redis://`` or ``rediss://``, as kombu reads it), with
the publisher's socket timeouts; redis-py's pool is safe across threads and, by its own pid
check, across forks. Neither side imports SQLAlchemy.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Collection
from typing import TYPE_CHECKING

from sessions.broker import REDIS_SOCKET_TIMEOUT
from sessions.client_settings import ClientSettings
from sessions.errors import BrokerUnavailableError, first_line
from sessions.redact import mask_url

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

#: Prefix of the key marking one settled batch (the batch id follows, as ``str(uuid)``).
KEY_PREFIX = "sessions:applied:"
#: Batch ids per ``MGET`` (all of them sent in one pipeline: one round trip).
MGET_CHUNK = 1000


def confirmation_key(batch_id: uuid.UUID) -> str:
    """The Redis key marking ``batch_id`` settled."""
    return f"{KEY_PREFIX}{batch_id}"


def redis_client(settings: ClientSettings) -> Redis:
    """A redis-py client of the broker ``settings`` name (no connection until first used).

    :raises ValueError: the broker URL is not a Redis one.
    """
    if not settings.uses_redis:
        raise ValueError(f"broker_url: {mask_url(settings.broker_url)} is not a Redis URL")
    from redis import Redis

    client: Redis = Redis.from_url(
        settings.broker_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
    )
    return client


def _redis_errors() -> tuple[type[Exception], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


class ConfirmationMarks:
    """The worker's side: mark batches settled, on the Redis broker ``settings`` name.

    Does nothing unless the broker is Redis and ``settings.broker_confirmations`` is on.
    Never raises: a mark that cannot be written is logged (once until one is written again)
    and only costs the agent a republished copy.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.enabled = settings.uses_redis and settings.broker_confirmations
        self._settings = settings
        self._ttl = int(settings.confirmation_ttl.total_seconds())
        self._client: Redis | None = None
        self._failing = False

    def mark(self, batch_id: uuid.UUID | None) -> None:
        """Mark ``batch_id`` settled (call only after its transaction has committed)."""
        if not self.enabled or batch_id is None:
            return
        try:
            if self._client is None:
                self._client = redis_client(self._settings)
            self._client.set(confirmation_key(batch_id), b"1", ex=self._ttl)
        except _redis_errors() as exc:
            if not self._failing:
                log.warning(
                    "cannot mark batch %s applied on Redis at %s (%s): its agent will publish "
                    "it again and the ledger drop the copy (logged once until a mark is written)",
                    batch_id,
                    mask_url(self._settings.broker_url),
                    first_line(exc),
                )
            self._failing = True
            return
        if self._failing:
            log.warning("marking batches applied on Redis works again")
        self._failing = False

    def after_fork(self) -> None:
        """In a forked child: forget the parent's client without closing its sockets."""
        self._client = None


class RedisConfirmer:
    """The agent's side: reads the marks workers leave on the Redis broker ``settings`` name.

    ``client`` replaces the redis-py client made from the broker URL (tests). Connects on the
    first look, not before.
    """

    def __init__(self, settings: ClientSettings, client: Redis | None = None) -> None:
        self.settings = settings
        self._client = client
        self._owns_client = client is None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"the confirmations on Redis at {mask_url(self.settings.broker_url)}"

    def applied(self, batch_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """The ones of ``batch_ids`` a worker marked settled.

        :raises BrokerUnavailableError: Redis does not answer (or refuses).
        """
        wanted = list(batch_ids)
        if not wanted:
            return set()
        client = self._client or self._open()
        try:
            pipeline = client.pipeline(transaction=False)
            for start in range(0, len(wanted), MGET_CHUNK):
                pipeline.mget([confirmation_key(b) for b in wanted[start : start + MGET_CHUNK]])
            replies = pipeline.execute()
        except _redis_errors() as exc:
            raise BrokerUnavailableError(f"{self.where}: {first_line(exc)}") from exc
        marks = itertools.chain.from_iterable(replies)
        return {batch_id for batch_id, mark in zip(wanted, marks, strict=True) if mark is not None}

    def _open(self) -> Redis:
        with self._lock:
            if self._client is None:
                self._client = redis_client(self.settings)
            return self._client

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client.connection_pool.disconnect()

    def after_fork(self) -> None:
        if self._owns_client:
            self._client = None  # the parent's sockets stay the parent's
        self._lock = threading.Lock()
