"""The settings an agent's client needs, read from ``SESSIONS_*`` without pydantic.

:class:`ClientSettings` declares the fields a recording agent reads (its broker, batching,
spool and confirmation), each with its type and bounds, as a frozen dataclass;
:class:`sessions.settings.Settings` inherits them and adds the worker's, the sweeps' and the
dashboard's, so each field is declared once.

Why no pydantic here: importing it costs an agent's start about 45 ms, about a sixth of the
whole, and pydantic-settings 40 ms more (its sources import asyncio, argparse, dotenv, the
cloud providers); the agent's start-up is a measured target (README, "Agent start-up"). What
the client needs is small and fixed: flat fields, no ``.env`` file, no secrets folder, no
nested or JSON-valued fields.

Pydantic stays the authority on what a field accepts. A value in its plain form (``500``,
``0.25``, ``true``, one of the choices, any text for a URL) within its field's
:class:`Bounds` is taken as it is; anything else (``" 7 "``, ``1e3``, ``yes``, a value out of
bounds, settings that break :func:`client_rule_problem`) is handed to
:class:`sessions.client_model.ClientModel` (imported, with pydantic, only then), which converts
it or raises its ``ValidationError``. :func:`environment_values` reads the variables the way
pydantic-settings' environment source reads them for these fields (``SESSIONS_`` and the field
name, case-insensitive); ``tests/unit/test_client_settings.py`` checks, field by field and by
Hypothesis over arbitrary strings, that this reader and pydantic-settings give the same values
and the same errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args, get_origin, get_type_hints

from sessions.bounds import MAX_DAYS, MAX_SECONDS
from sessions.redact import mask_value

#: Every setting's environment variable is this and the field's name (any case).
ENV_PREFIX = "SESSIONS_"


def default_spool_dir() -> Path:
    """``$XDG_CACHE_HOME/agent-sessions/spool`` (``~/.cache/...``): per user, survives restarts."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "agent-sessions" / "spool"


def environment_values(
    fields: Collection[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The values ``environ`` (default ``os.environ``) gives the settings named ``fields``.

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


@dataclass(frozen=True, slots=True)
class Bounds:
    """A number field's bounds (``Annotated[int, Bounds(gt=0)]``), read by both validators:
    :meth:`admits` here, and pydantic through :meth:`__get_pydantic_core_schema__`, which
    puts them in the field's core schema (the errors of ``Field(gt=0)``)."""

    gt: float | None = None
    ge: float | None = None
    le: float | None = None

    def admits(self, value: float) -> bool:
        """Whether ``value`` lies within the bounds."""
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.le is None or value <= self.le)
        )

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        for name in ("gt", "ge", "le"):
            if getattr(self, name) is not None:
                schema[name] = getattr(self, name)
        return schema


@dataclass(frozen=True, kw_only=True, repr=False)
class ClientSettings:
    """What an agent's client reads: broker, batching, spool, confirmation.

    Made by :meth:`from_environment` (what :class:`~sessions.SessionTracker` does when given
    no settings), or with values: ``ClientSettings(broker_url="redis://...")``, which reads
    no environment. A full :class:`~sessions.settings.Settings` is a ``ClientSettings`` too.

    :raises pydantic.ValidationError: a value breaks its field's rule, or the settings break
        :func:`client_rule_problem`; each error's location is the field, and no value is shown.
    """

    #: SQLAlchemy URL of the store; the embedded default is a SQLite file in the working dir.
    #: An agent reads it only to confirm through the ledger (``confirmer`` ``ledger``).
    database_url: str = "sqlite:///sessions.db"
    #: Celery broker; ``filesystem://`` needs no server (messages live in ``broker_dir``).
    broker_url: str = "filesystem://"
    #: Folder of the filesystem broker (only used with ``filesystem://``).
    broker_dir: Path = Path(".sessions-broker")
    #: Seconds between polls of a polling broker (filesystem, SQLAlchemy transports).
    broker_polling_interval: Annotated[float, Bounds(gt=0)] = 0.1
    #: Redis visibility timeout: an unacknowledged message is redelivered after this long.
    visibility_timeout_seconds: Annotated[int, Bounds(gt=0, le=MAX_SECONDS)] = 3600

    #: The client publishes its buffer at least this often ...
    flush_interval_ms: Annotated[int, Bounds(gt=0)] = 50
    #: ... or as soon as it holds this many events (one Celery message per batch). 5000, not
    #: 2000 (nor 500): measured side by side (README, Performance, items 2 and 9), 1.25-1.52x
    #: the events/s end to end and about half of PostgreSQL's CPU per event at saturation
    #: (more of a session's events coalesce into one row write), with the same event-to-commit
    #: p99 at 10,000 events/s (the flush interval, not the size, cuts batches below
    #: saturation); a busy worker holds some 26 MB more. Half the store's largest batch.
    batch_max_events: Annotated[int, Bounds(gt=0)] = 5000

    #: Where a client keeps batches it could not publish (one SQLite file, shared per user).
    spool_dir: Path = field(default_factory=default_spool_dir)
    #: Longest time a client keeps an unsent batch in its local spool before giving up.
    spool_max_age_days: Annotated[float, Bounds(gt=0, le=MAX_DAYS)] = 7.0
    #: Most batches the spool holds; beyond, new batches are refused (counted, logged).
    spool_max_batches: Annotated[int, Bounds(gt=0)] = 20_000
    #: Most megabytes the spool holds; beyond, new batches are refused (counted, logged).
    spool_max_megabytes: Annotated[int, Bounds(gt=0)] = 256

    #: A published batch not confirmed applied this many seconds later is published again
    #: (the wait doubles each time); 0 turns republishing off (RabbitMQ does not need it).
    confirm_timeout_seconds: Annotated[float, Bounds(ge=0)] = 60.0
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
    confirmation_ttl_seconds: Annotated[int, Bounds(gt=0, le=MAX_SECONDS)] = 3600
    #: Applied-batch ids are kept this long to recognise redelivered batches. A client's
    #: setting too: it must outlive the longest time the client's spool and the broker can
    #: bring a batch back, which an agent's settings decide (checked below, in the agent).
    #: The workers' purge keeps what *their* environment says: set the same value on both.
    ledger_retention_days: Annotated[float, Bounds(gt=0, le=MAX_DAYS)] = 14.0

    def __post_init__(self) -> None:
        # Values of the plain types within bounds, obeying the client's rules, are kept as
        # given; anything else is pydantic's to convert or refuse (ClientModel's errors).
        if all(_FIELDS[name].admits(getattr(self, name)) for name in _FIELDS) and (
            client_rule_problem(self) is None
        ):
            return
        from sessions.client_model import ClientModel

        validated = ClientModel.model_validate(client_values(self))
        for name in _FIELDS:
            object.__setattr__(self, name, getattr(validated, name))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The client's settings from ``SESSIONS_*`` variables (default ``os.environ``).

        :raises pydantic.ValidationError: a value breaks its field's rule; each error's
            location is the field (``describe_settings_error`` names the variable), and no
            value is shown.
        """
        texts = environment_values(_FIELDS, environ)
        values = {name: _FIELDS[name].parse(text) for name, text in texts.items()}
        if any(value is _UNDECIDED for value in values.values()):
            from sessions.client_model import ClientModel

            return cls(**client_values(ClientModel.model_validate(texts)))
        return cls(**values)

    def __repr__(self) -> str:
        # repr() and str() mask what could hold a credential (the URLs' passwords).
        shown = ", ".join(
            f"{name}={mask_value(name, value)!r}" for name, value in client_values(self).items()
        )
        return f"{type(self).__name__}({shown})"

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


def client_rule_problem(settings: ClientSettings) -> str | None:
    """What breaks the rules between the client's fields, if anything (one message).

    Checked by :class:`ClientSettings` and, through :class:`~sessions.client_model.ClientModel`,
    by the full :class:`~sessions.settings.Settings`.
    """
    if settings.confirmer == "redis" and not settings.uses_redis:
        return (
            "confirmer 'redis' reads the marks workers leave on a Redis broker: it needs a "
            "redis:// or rediss:// broker_url"
        )
    # The exactly-once guard: the ledger must still hold a batch's id when the last copy
    # of it can arrive (replayed from a spool, redelivered by the broker).
    redelivery_window = settings.spool_max_age + timedelta(
        seconds=settings.visibility_timeout_seconds
    )
    if settings.ledger_retention < redelivery_window:
        return (
            "ledger_retention_days must outlive the longest time a batch can come back "
            f"(spool_max_age_days + visibility_timeout_seconds = {redelivery_window}); "
            f"got {settings.ledger_retention}: a batch replayed after its ledger row is purged "
            "would be counted twice"
        )
    return None


def client_values(settings: ClientSettings) -> dict[str, Any]:
    """The client's fields of ``settings`` (a full :class:`~sessions.settings.Settings` too)."""
    return {name: getattr(settings, name) for name in _FIELDS}


#: What :meth:`_Field.parse` gives for a text pydantic must decide on.
_UNDECIDED: Any = object()
#: The plain forms of a number in an environment variable, which ``int()`` and ``float()``
#: read exactly as pydantic does (no sign, space, underscore, exponent or leading zero).
_PLAIN_INT = re.compile(r"0|[1-9][0-9]{0,17}")
_PLAIN_FLOAT = re.compile(r"(0|[1-9][0-9]{0,15})(\.[0-9]{1,15})?")
_PLAIN_BOOLS = {"true": True, "false": False, "1": True, "0": False}


@dataclass(frozen=True, slots=True)
class _Field:
    """One client field's type, as the plain values it admits and the texts it parses."""

    kind: type
    bounds: Bounds
    choices: tuple[str, ...] = ()

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is plainly valid: of the field's type itself, within bounds."""
        if self.choices:
            return type(value) is str and value in self.choices
        if self.kind is Path:
            return isinstance(value, Path)
        if self.kind is float:  # pydantic's rules for infinity and NaN decide those
            return type(value) is float and math.isfinite(value) and self.bounds.admits(value)
        if self.kind is int:
            return type(value) is int and self.bounds.admits(value)
        return type(value) is self.kind

    def parse(self, text: str) -> Any:
        """The value of an environment variable's ``text``, if it is in a plain form; else
        :data:`_UNDECIDED`."""
        if self.kind is str:
            value: Any = text
        elif self.choices:
            value = text if text in self.choices else _UNDECIDED
        elif self.kind is Path:
            value = Path(text) if text else _UNDECIDED
        elif self.kind is bool:
            value = _PLAIN_BOOLS.get(text, _UNDECIDED)
        elif self.kind is int:
            value = int(text) if _PLAIN_INT.fullmatch(text) else _UNDECIDED
        else:
            value = float(text) if _PLAIN_FLOAT.fullmatch(text) else _UNDECIDED
        return value if value is _UNDECIDED or self.admits(value) else _UNDECIDED


def _client_fields() -> dict[str, _Field]:
    found: dict[str, _Field] = {}
    hints = get_type_hints(ClientSettings, include_extras=True)
    for declared in dataclasses.fields(ClientSettings):
        hint = hints[declared.name]
        bounds = Bounds()
        if get_origin(hint) is Annotated:
            hint, bounds = get_args(hint)
        if get_origin(hint) is Literal:
            found[declared.name] = _Field(str, bounds, get_args(hint))
        else:
            found[declared.name] = _Field(hint, bounds)
    return found


#: Every client field by name, in declaration order.
_FIELDS = _client_fields()
#: The names of the client's fields.
CLIENT_FIELDS: tuple[str, ...] = tuple(_FIELDS)
