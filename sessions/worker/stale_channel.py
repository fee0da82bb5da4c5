"""A Redis channel whose broker connection is gone fails with a connection error, not a crash.

The fault (Celery 5.7.0 with kombu 5.7.0; kombu's half is in every kombu 5.x up to its main
branch of August 2026): when the worker's consumer loses the broker,
``Consumer.on_connection_error_after_connected`` first calls ``connection.collect()``, which
ends in ``Connection._do_close_transport``: ``transport.client = None``. Celery 5.7 then also
calls ``connection.close()`` (celery/celery#10242, for GH-9705), which closes the channel for
real: ``Channel._disconnect_pools`` sets its pool to ``None``. The next Redis command through
that channel (restoring its unacknowledged messages in that same close, or acknowledging a
task that finishes a moment later: ``ack_log_error`` -> ``basic_ack`` ->
``_remove_from_indices``) builds a new pool from ``Channel._connparams``, which reads
``self.connection.client.hostname`` and raises ``AttributeError``. That is not one of the
transport's ``connection_errors``, so neither ``maybe_close_channel``, ``ignore_errors`` nor
``ack_log_error`` catches it: the worker logs ``Unrecoverable error`` and exits for good.
Celery 5.6 does not close the connection a second time there, so the channel keeps its pool
and the fault stays latent (it survived the same test).

The repair: :func:`install` wraps ``Channel._connparams`` so that a channel whose transport was
detached from its connection raises :class:`DetachedChannelError`, a
``redis.exceptions.ConnectionError``: what the channel's connection really is, and what every
caller already handles. The consumer goes on with its reconnect (a new connection, new
channels); the command on the old channel fails as it would on a dead socket:

* an acknowledgement is logged (``Couldn't ack``) and not done: the message stays in Redis's
  unacknowledged set and comes back after the visibility timeout, or, if Redis lost it (a
  restart without persistence), was already applied: the ledger makes a redelivery harmless;
* a rejection back to the queue, or the restore at close, is not done either: the message comes
  back after the visibility timeout, or, if Redis lost it, the tracker republishes the batch it
  does not see in the ledger (README, "Using it").

A channel that still has its connection is untouched: the wrapper only reads two attributes
before calling kombu's own method.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis.exceptions
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: Marks kombu's method once wrapped, so that installing twice wraps it once.
_WRAPPED = "_sessions_detached_guard"


class DetachedChannelError(redis.exceptions.ConnectionError):
    """A command on a Redis channel whose broker connection was already closed."""


def install() -> None:
    """Wrap kombu's ``Channel._connparams`` (idempotent; every Redis channel of the process)."""
    original: Callable[..., dict[str, Any]] | None = getattr(
        kombu_redis.Channel, "_connparams", None
    )
    if original is None:
        # A kombu that no longer has the method has reworked what it guarded: nothing to wrap.
        log.warning("kombu's Redis Channel has no _connparams; the stale-channel guard is off")
        return
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def _connparams(self: kombu_redis.Channel, *args: Any, **kwargs: Any) -> dict[str, Any]:
        transport = self.connection
        if transport is None or getattr(transport, "client", None) is None:
            raise DetachedChannelError(
                "this Redis channel's broker connection was closed (after a connection loss);"
                " its command is dropped, the consumer goes on with a new connection"
            )
        return original(self, *args, **kwargs)

    setattr(_connparams, _WRAPPED, True)
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


def installed() -> bool:
    """Whether :func:`install` has wrapped kombu's method in this process."""
    return bool(getattr(kombu_redis.Channel._connparams, _WRAPPED, False))
