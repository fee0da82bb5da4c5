"""Every knob of the system, read once from ``SESSIONS_*`` environment variables.

Workers, beat, the CLI, the dashboard and the tests read the same :class:`Settings`, so a
deployment is configured in one place; an agent that only records reads the part of it it
needs, :class:`~sessions.client_settings.ClientSettings` (whose fields :class:`Settings`
inherits), without importing pydantic-settings. Credentials only ever come from the
environment and are masked whenever a URL is shown (:func:`mask_url`, from
:mod:`sessions.redact`): a settings object's ``repr`` masks its URLs, the dashboard token is a
``SecretStr``, and a validation error names the field and the rule but never shows the value
it was given.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sessions.bounds import MAX_DAYS, MAX_SECONDS
from sessions.client_model import ClientModel
from sessions.client_settings import ENV_PREFIX, ClientSettings, client_values
from sessions.client_settings import default_spool_dir as default_spool_dir  # re-exported
from sessions.redact import mask_url as mask_url  # re-exported: callers import it from here

#: Fewest characters of a dashboard token (``openssl rand -hex 24`` gives 48).
MIN_TOKEN_LENGTH = 16


class Settings(ClientModel, BaseSettings):
    """Configuration of the session-metrics pipeline (environment prefix ``SESSIONS_``).

    The client's fields come from :class:`~sessions.client_settings.ClientSettings` (through
    :class:`~sessions.client_model.ClientModel`, which checks the rules between them); these
    are the worker's, the sweeps', the store's and the dashboard's. ``Settings()`` reads the
    environment (pydantic-settings); values given as arguments override it. Copy one with
    ``model_copy(update=...)``: it is a ``ClientSettings`` dataclass too, but
    ``dataclasses.replace`` would build it again from the environment.
    """

    # hide_input_in_errors: a ValidationError shows no input, since the input may be the token
    # (too short) or hold it (a model-level error shows every value it was given).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        title="Settings",
    )

    #: A session idle this long is expired by the idle sweep (the guide's 30 minutes).
    #: Every duration is at most 100 years (``sessions.bounds``), which the sweeps take too.
    max_idle_seconds: int = Field(1800, gt=0, le=MAX_SECONDS)
    #: A session older than this is expired by the age sweep (the guide's 7 days).
    max_age_days: float = Field(7.0, gt=0, le=MAX_DAYS)
    #: Error rate above which the health sweep warns (the guide's 0.3).
    health_warn_rate: float = Field(0.3, ge=0, le=1)
    #: Error rate above which the health sweep ends a session as ``failed`` (the guide's 0.5).
    health_fail_rate: float = Field(0.5, ge=0, le=1)
    #: Requests a session needs before the health sweep judges it (the guide: any request).
    health_min_requests: int = Field(1, ge=1)
    #: Cap on active sessions for ``create_session``; ``None`` means no cap.
    max_active_sessions: int | None = Field(None, gt=0)
    #: Idle time after which ``create_session`` at the cap reclaims sessions (the guide's 15 min).
    session_limit_idle_seconds: int = Field(900, gt=0, le=MAX_SECONDS)

    #: Ended sessions (and their past runs, with their conversations) are purged this long
    #: after they ended; checkpoints this long after they were stored.
    ended_retention_days: float = Field(30.0, gt=0, le=MAX_DAYS)
    #: Messages kept per session run (the oldest go first); the conversation of a run.
    conversation_max_messages: int = Field(1000, gt=0, le=1_000_000)
    #: Checkpoints kept per thread (``ContextEngineAdapter``: per agent), the newest versions.
    checkpoints_per_thread: int = Field(100, gt=0, le=1_000_000)
    #: A message redelivered unfinished this many times (it kills the worker) is dead-lettered.
    max_redeliveries: int = Field(5, ge=1)

    #: Largest batch the store accepts; a bigger payload is dead-lettered whole.
    store_max_batch_events: int = Field(10_000, gt=0)

    #: Beat intervals of the housekeeping sweeps, in seconds.
    idle_sweep_interval: float = Field(60.0, gt=0)
    age_sweep_interval: float = Field(3600.0, gt=0)
    health_sweep_interval: float = Field(300.0, gt=0)
    purge_interval: float = Field(86400.0, gt=0)

    #: Messages a worker process reserves ahead; small, because each carries thousands of
    #: events. ``None``: 1 on Redis and RabbitMQ, 4 on a polling broker such as the
    #: filesystem (:func:`sessions.worker.config.prefetch_multiplier` says why).
    worker_prefetch_multiplier: int | None = Field(None, gt=0)

    #: Port of a worker's Prometheus endpoint (``/metrics``, served by its main process);
    #: 0 = no endpoint and no metrics kept. Each worker on a host needs a port of its own.
    metrics_port: int = Field(0, ge=0, le=65535)
    #: Address the endpoint binds: loopback unless a scraper elsewhere must reach it.
    metrics_host: str = "127.0.0.1"
    #: Folder of prometheus-client's per-process files (``PROMETHEUS_MULTIPROC_DIR``), one
    #: per worker, emptied of them at start; ``None`` = a fresh private temporary folder.
    metrics_dir: Path | None = None

    #: Address ``sessions dashboard`` binds; the loopback default keeps the page on this host.
    dashboard_host: str = "127.0.0.1"
    #: Port ``sessions dashboard`` listens on; 0 = any free port (its log says which).
    dashboard_port: int = Field(8750, ge=0, le=65535)
    #: Bearer token the dashboard asks for; unset, it asks for none (loopback only).
    dashboard_token: SecretStr | None = None

    @field_validator("dashboard_token")
    @classmethod
    def _check_token(cls, token: SecretStr | None) -> SecretStr | None:
        # Checked here, not by Field(min_length=...): pydantic's message for a SecretStr speaks
        # of "items". The value stays out of the error (hide_input_in_errors).
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters long")
        return token

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.health_warn_rate > self.health_fail_rate:
            raise ValueError(
                f"health_warn_rate ({self.health_warn_rate}) must not exceed "
                f"health_fail_rate ({self.health_fail_rate})"
            )
        return self

    @property
    def max_age(self) -> timedelta:
        return timedelta(days=self.max_age_days)

    @property
    def ended_retention(self) -> timedelta:
        return timedelta(days=self.ended_retention_days)


def describe_settings_error(error: ValidationError) -> str:
    """``error`` as one line naming each environment variable and its rule, never its value.

    ``Settings`` hides inputs from its errors, so nothing here can show a credential.
    """
    problems = []
    for detail in error.errors(include_input=False, include_url=False):
        names = "_".join(str(part) for part in detail["loc"]).upper()
        message = detail["msg"].removeprefix("Value error, ")
        problems.append(f"SESSIONS_{names}: {message}" if names else message)
    return "invalid settings: " + "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()


def full_settings(settings: ClientSettings) -> Settings:
    """``settings`` as a full :class:`Settings`: itself if it is one, else one with its values
    over the environment's (what a client hands the store it opens to read the ledger).

    :raises pydantic.ValidationError: the environment's other settings break a rule.
    """
    if isinstance(settings, Settings):
        return settings
    return Settings(**client_values(settings))
