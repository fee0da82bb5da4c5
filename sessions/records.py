"""What the store returns: read models of sessions, aggregates and the outcome of writes.

These are plain frozen pydantic models, detached from any database session, so callers
can keep them, serialize them (``model_dump(mode="json")``) and compare them freely.

Processing-time percentiles (``processing_time_p50`` / ``_p95`` / ``_p99``, in seconds) are
estimated from a latency histogram (``sessions.histogram``: within 2.47 % for times from
1 ms to 1 hour) and are ``None`` where there is no request to estimate from.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, computed_field

from sessions.bounds import check_seconds
from sessions.histogram import percentile

#: The additive counters every session run carries (and the store's deltas, in this order).
COUNTERS = (
    "request_count",
    "error_count",
    "total_processing_time",
    "input_tokens",
    "output_tokens",
    "cost",
)
#: Every state a session can be in; only ``active`` is not final.
Status = Literal["active", "completed", "failed", "expired"]
#: Every status a session can have, in the order reports list them.
STATUSES: tuple[Status, ...] = get_args(Status)
#: Why a session ended: an ``end`` event, or one of the housekeeping sweeps.
EndReason = Literal["explicit", "idle", "age", "health"]
#: Why something was dead-lettered, as a small fixed set (the stored reason text says more):
#: the store sets aside ``invalid_event`` (refused by the event model), ``refused_by_database``
#: (accepted by the model, refused by a column) and ``malformed_batch`` (no usable envelope:
#: not an object, no UUID, too many events); the worker sets aside whole messages that are
#: ``poison`` (redelivered unfinished too often), that it ``cannot_apply`` (a permanent error)
#: or that kept failing with an ``unexpected_error``, and queue items that were no message at
#: all, ``unreadable_message`` (``sessions.worker.envelopes``). ``batch_id_reused`` is a batch
#: whose id the ledger holds for other content: set aside whole, not applied.
DeadLetterReason = Literal[
    "invalid_event",
    "refused_by_database",
    "malformed_batch",
    "poison",
    "cannot_apply",
    "unexpected_error",
    "unreadable_message",
    "batch_id_reused",
]
#: What ``top_users`` can rank users by: their requests, errors, cost or p95 processing time.
UserRanking = Literal["requests", "errors", "cost", "p95"]
#: The percentiles the read models carry, by field name.
PERCENTILES = {
    "processing_time_p50": 0.50,
    "processing_time_p95": 0.95,
    "processing_time_p99": 0.99,
}


def percentile_fields(histogram: Mapping[int, int]) -> dict[str, float | None]:
    """The read models' percentile fields, estimated from one histogram (bucket -> count)."""
    return {name: percentile(histogram, fraction) for name, fraction in PERCENTILES.items()}


class PerRequest:
    """The rates derived from the counters, the same for a session and for totals over many
    (pydantic computed fields: they are dumped and serialized with the model's fields)."""

    if TYPE_CHECKING:  # the models that mix this in declare them (as their fields)
        request_count: int
        error_count: int
        total_processing_time: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def error_rate(self) -> float:
        """Errors per request; 0 without requests."""
        return self.error_count / self.request_count if self.request_count else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def average_processing_time(self) -> float:
        """Seconds per request; 0 without requests."""
        return self.total_processing_time / self.request_count if self.request_count else 0.0


class SessionRecord(PerRequest, BaseModel):
    """One session (its current run) as stored, with the guide's fields and derived rates."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    user_id: str | None
    status: Status
    end_reason: EndReason | None
    run: int
    created_at: datetime
    last_activity: datetime
    ended_at: datetime | None
    request_count: int
    error_count: int
    total_processing_time: float
    input_tokens: int
    output_tokens: int
    cost: float
    processing_time_p50: float | None = None
    processing_time_p95: float | None = None
    processing_time_p99: float | None = None
    metadata: dict[str, Any] | None

    def is_expired(self, max_idle_seconds: float = 1800, now: datetime | None = None) -> bool:
        """The guide's check before it replaces a session: is this run past use?

        ``True`` for a run that has ended, ``completed``, ``failed`` or ``expired`` (by an
        ``end`` or by a sweep), however recent its activity: recording into it still counts
        but never makes it active again, and only a ``create`` starts a new run. The guide's
        pool and timeout patterns re-create a session exactly when this is true, so they
        never hand out an ended one. ``True`` as well for an ``active`` run idle (by event
        time) for longer than ``max_idle_seconds``, which the idle sweep has not reached yet.

        :param max_idle_seconds: idle seconds an active run may have (the guide's 30 minutes
            by default; the idle sweep uses ``SESSIONS_MAX_IDLE_SECONDS``).
        :param now: the moment to judge at, timezone-aware; the wall clock by default.
        :raises ValueError: ``max_idle_seconds`` is negative, above 100 years or not a finite
            number (``TypeError``: not a number).
        """
        check_seconds("max_idle_seconds", max_idle_seconds, zero=True)
        if self.status != "active":
            return True
        now = now or datetime.now(UTC)
        return now - self.last_activity > timedelta(seconds=max_idle_seconds)


class Aggregate(PerRequest, BaseModel):
    """Totals over a set of sessions, computed in SQL; percentiles of their merged histograms."""

    model_config = ConfigDict(frozen=True)

    sessions: int
    request_count: int
    error_count: int
    total_processing_time: float
    input_tokens: int
    output_tokens: int
    cost: float
    processing_time_p50: float | None = None
    processing_time_p95: float | None = None
    processing_time_p99: float | None = None


class UserAggregate(Aggregate):
    """One user's totals and percentiles over their sessions (``top_users``)."""

    user_id: str


class MinuteActivity(BaseModel):
    """One minute (UTC, by event time) of the whole fleet: what happened, who was active."""

    model_config = ConfigDict(frozen=True)

    minute: datetime
    events: int
    requests: int
    errors: int
    #: Session runs active at some point in the minute: created before its end, and not
    #: ended before its start.
    active_sessions: int


class ApplyResult(BaseModel):
    """What one ``apply`` did, in events: applied, skipped as a redelivery, dead-lettered."""

    model_config = ConfigDict(frozen=True)

    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    #: This apply inserted the batch id into the ledger: the batch now counts. ``False`` for
    #: a duplicate and for a payload without a usable id (nothing to dedupe by).
    claimed: bool = False
    #: ``rejected`` split by why each was dead-lettered (reasons with none left out).
    rejected_by_reason: dict[DeadLetterReason, int] = Field(default_factory=dict)
    #: The batch's id was in the ledger already, for other content: it was set aside whole
    #: (``batch_id_reused``), not applied. ``False`` for a plain duplicate.
    reused: bool = False
    #: Event time of the oldest applied event (``None`` when none was applied): the worker's
    #: event-to-commit lag is measured from it, once per batch.
    oldest_event_at: datetime | None = None


class SweepResult(BaseModel):
    """The sessions one sweep changed (ended) or flagged (health warnings)."""

    model_config = ConfigDict(frozen=True)

    sweep: str
    changed: tuple[str, ...] = ()
    warned: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.changed)


class PurgeResult(BaseModel):
    """Rows removed by ``purge``."""

    model_config = ConfigDict(frozen=True)

    sessions: int
    runs: int
    ledger: int
    #: Histogram buckets (with a request) of the purged sessions and runs, which went with
    #: their rows.
    latency: int = 0
    #: Conversation messages of the purged sessions and runs.
    messages: int = 0
    #: Checkpoints stored before the cutoff (with their writes).
    checkpoints: int = 0
    #: Rows of ``activity_minutes``.
    minutes: int = 0
    redeliveries: int = 0
    dead_letters: int = 0


class MessageRecord(BaseModel):
    """One message of a session run's conversation, as stored."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    run: int
    message_id: uuid.UUID
    #: Its place in the conversation (the producer's hybrid logical clock).
    seq: int
    #: When it was said, by the producer's clock.
    at: datetime
    role: str
    content: str
    metadata: dict[str, Any] | None = None


class CheckpointRecord(BaseModel):
    """One stored checkpoint of a thread: its data and metadata as JSON values."""

    model_config = ConfigDict(frozen=True)

    thread_id: str
    checkpoint_id: str
    #: Counts up per thread with every store: the latest checkpoint has the highest.
    version: int
    data: Any
    metadata: dict[str, Any] | None = None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as aiecs's own context engine returns it (``created_at`` as ISO text,
        ``metadata`` an object), plus ``version``."""
        return {
            "checkpoint_id": self.checkpoint_id,
            "thread_id": self.thread_id,
            "data": self.data,
            "metadata": self.metadata or {},
            "created_at": self.created_at.isoformat(),
            "version": self.version,
        }
