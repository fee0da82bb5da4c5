"""The settings an agent's client needs, read from ``SESSIONS_*`` without pydantic-settings.

:class:`ClientSettings` declares the fields a recording agent reads (its broker, batching,
spool and confirmation); :class:`sessions.settings.Settings` inherits them and adds the
worker's, the sweeps' and the dashboard's, so each field is declared once.

Why a reader of our own: importing pydantic-settings costs an agent's start about 40 ms
(its sources import asyncio, argparse, dotenv, the cloud providers), as much as the rest of
the tracker's own imports together, and the agent's start-up is a measured target (README,
"Agent start-up"). What the client needs from it is small and fixed: flat fields, no
``.env`` file, no secrets folder, no nested or JSON-valued fields. :func:`environment_values`
does that one thing the way pydantic-settings' environment source does it for these fields
(``SESSIONS_`` and the field name, case-insensitive, the string handed to the model to
validate); ``tests/unit/test_client_settings.py`` checks, field by field, that both readers
give the same values and the same errors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sessions.bounds import MAX_DAYS, MAX_SECONDS
from sessions.redact import mask_value

#: Every setting's environment variable is this and the field's name (any case).
ENV_PREFIX = "SESSIONS_"


def default_spool_dir() -> Path:
    """``$XDG_CACHE_HOME/agent-sessions/spool`` (``~/.cache/...``): per user, survives restarts."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "agent-sessions" / "spool"


def environment_values(
    fields: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The values ``environ`` (default ``os.environ``) gives the settings named in ``fields``.

    As pydantic-settings reads them with ``case_sensitive=False``: the variable is
    :data:`ENV_PREFIX` and the field's name in any case (of two spellings of one name, the
    later in ``environ`` wins), and its value is the raw string, for the model to validate.
    """
    wanted = {f"{ENV_PREFIX}{name}".lower(): name for name in fields}
    values: dict[str, str] = {}
    for key, value in (os.environ if environ is None else environ).items():
        name = wanted.get(key.lower())
        if name is not None:
            values[name] = value
    return values


class ClientSettings(BaseModel):
    """What an agent's client reads: broker, batching, spool, confirmation.

    Made by :meth:`from_environment` (what :class:`~sessions.SessionTracker` does when given
    no settings), or with values: ``ClientSettings(broker_url="redis://...")``, which reads
    no environment. A full :class:`~sessions.settings.Settings` is a ``ClientSettings`` too.
    """

    # hide_input_in_errors: a ValidationError shows no input, since the input may hold a
    # credential (a URL's password).
    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    #: SQLAlchemy URL of the store; the embedded default is a SQLite file in the working dir.
    #: An agent reads it only to confirm through the ledger (``confirmer`` ``ledger``).
    database_url: str = "sqlite:///sessions.db"
    #: Celery broker; ``filesystem://`` needs no server (messages live in ``broker_dir``).
    broker_url: str = "filesystem://"
    #: Folder of the filesystem broker (only used with ``filesystem://``).
    broker_dir: Path = Path(".sessions-broker")
    #: Seconds between polls of a polling broker (filesystem, SQLAlchemy transports).
    broker_polling_interval: float = Field(0.1, gt=0)
    #: Redis visibility timeout: an unacknowledged message is redelivered after this long.
    visibility_timeout_seconds: int = Field(3600, gt=0, le=MAX_SECONDS)

    #: The client publishes its buffer at least this often ...
    flush_interval_ms: int = Field(50, gt=0)
    #: ... or as soon as it holds this many events (one Celery message per batch). 5000, not
    #: 2000 (nor 500): measured side by side (README, Performance, items 2 and 9), 1.25-1.52x
    #: the events/s end to end and about half of PostgreSQL's CPU per event at saturation
    #: (more of a session's events coalesce into one row write), with the same event-to-commit
    #: p99 at 10,000 events/s (the flush interval, not the size, cuts batches below
    #: saturation); a busy worker holds some 26 MB more. Half the store's largest batch.
    batch_max_events: int = Field(5000, gt=0)

    #: Where a client keeps batches it could not publish (one SQLite file, shared per user).
    spool_dir: Path = Field(default_factory=default_spool_dir)
    #: Longest time a client keeps an unsent batch in its local spool before giving up.
    spool_max_age_days: float = Field(7.0, gt=0, le=MAX_DAYS)
    #: Most batches the spool holds; beyond, new batches are refused (counted, logged).
    spool_max_batches: int = Field(20_000, gt=0)
    #: Most megabytes the spool holds; beyond, new batches are refused (counted, logged).
    spool_max_megabytes: int = Field(256, gt=0)

    #: A published batch not confirmed applied this many seconds later is published again
    #: (the wait doubles each time); 0 turns republishing off (RabbitMQ does not need it).
    confirm_timeout_seconds: float = Field(60.0, ge=0)
    #: What tells an agent its batches were applied: ``redis`` (the marks the workers leave on
    #: a Redis broker: broker access only), ``ledger`` (the database's ledger: read access to
    #: the database), or ``auto`` (``redis`` on a Redis broker, else ``ledger``).
    confirmer: Literal["auto", "redis", "ledger"] = "auto"
    #: Whether a worker on a Redis broker marks each batch it settled there (one ``SET`` per
    #: batch); off, agents must confirm through the ledger (``SESSIONS_CONFIRMER=ledger``).
    broker_confirmations: bool = True
    #: How long a worker's mark stays on Redis after the apply. An agent looks within seconds
    #: of it; one that looks later (it was stopped, or cut off from Redis) republishes once, a
    #: copy the ledger drops and whose worker marks it again. An hour keeps the marks of a busy
    #: fleet to megabytes in the broker's own Redis.
    confirmation_ttl_seconds: int = Field(3600, gt=0, le=MAX_SECONDS)
    #: Applied-batch ids are kept this long to recognise redelivered batches. A client's
    #: setting too: it must outlive the longest time the client's spool and the broker can
    #: bring a batch back, which an agent's settings decide (checked below, in the agent).
    #: The workers' purge keeps what *their* environment says: set the same value on both.
    ledger_retention_days: float = Field(14.0, gt=0, le=MAX_DAYS)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The client's settings from ``SESSIONS_*`` variables (default ``os.environ``).

        :raises pydantic.ValidationError: a value breaks its field's rule; each error's
            location is the field (``describe_settings_error`` names the variable), and no
            value is shown.
        """
        return cls.model_validate(environment_values(cls.model_fields, environ))

    @model_validator(mode="after")
    def _check_client_rules(self) -> ClientSettings:
        if self.confirmer == "redis" and not self.uses_redis:
            raise ValueError(
                "confirmer 'redis' reads the marks workers leave on a Redis broker: it needs a "
                "redis:// or rediss:// broker_url"
            )
        # The exactly-once guard: the ledger must still hold a batch's id when the last copy
        # of it can arrive (replayed from a spool, redelivered by the broker).
        redelivery_window = self.spool_max_age + timedelta(seconds=self.visibility_timeout_seconds)
        if self.ledger_retention < redelivery_window:
            raise ValueError(
                "ledger_retention_days must outlive the longest time a batch can come back "
                f"(spool_max_age_days + visibility_timeout_seconds = {redelivery_window}); "
                f"got {self.ledger_retention}: a batch replayed after its ledger row is purged "
                "would be counted twice"
            )
        return self

    def __repr_args__(self) -> Any:
        # repr() and str() mask what could hold a credential (the URLs' passwords).
        for name, value in super().__repr_args__():
            yield name, mask_value(name or "", value)

    @property
    def uses_redis(self) -> bool:
        """Whether the broker is a Redis server (``redis://`` or ``rediss://``)."""
        return self.broker_url.startswith(("redis:", "rediss:"))

    @property
    def confirms_on_redis(self) -> bool:
        """Whether agents confirm their batches by the workers' marks on Redis."""
        return self.confirmer == "redis" or (self.confirmer == "auto" and self.uses_redis)

    @property
    def confirmation_ttl(self) -> timedelta:
        """How long a worker's mark of a settled batch stays on Redis."""
        return timedelta(seconds=self.confirmation_ttl_seconds)

    @property
    def spool_max_age(self) -> timedelta:
        return timedelta(days=self.spool_max_age_days)

    @property
    def ledger_retention(self) -> timedelta:
        return timedelta(days=self.ledger_retention_days)
