"""The store's apply semantics in plain Python, one event at a time, for property tests.

This is the specification the hypothesis properties hold ``SessionStore.apply`` to. It
implements the rules of issue 3 and of the ``sessions/apply.py`` docstring directly and
eagerly (every event changes the state at once; nothing is coalesced), so any difference
from the store is either a bug in the store's batching, its fast/slow paths, its SQL, or
in this model:

* a batch whose id was applied before changes nothing;
* a ``record`` adds its request (unless ``counts_request`` is false), error, time, tokens
  and cost; for an unknown session it creates it active; for an ended session it is still
  counted and never reopens it;
* a ``create`` for an active session changes no counter (it is activity, and fills a
  missing owner or metadata); for an ended session it begins a new run when it is not
  older than the end, the ended run moving to the history;
* an ``end`` for an unknown session creates it ended; for an active session it ends it;
  for an ended one it changes no status (the first end wins) but is still activity;
* event time decides the run: an event older than the live run's ``created_at`` (from the
  second run on) belongs to an earlier run: a record is added to the run that was live at
  its time, anything else is ignored;
* ``last_activity`` is the latest event time of the run; while the first run is live, an
  older event moves its ``created_at`` back (a later run starts at its ``create``, and an
  archived run keeps the ``created_at`` it had when it was archived);
* a ``record`` that counts a request adds one to the bucket of its processing time in the
  histogram of the run it is added to (so a run's histogram holds ``request_count``
  samples), and every applied event counts in the minute of its ``at``: one event, and a
  record's request and error.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent
from sessions.histogram import bucket_of
from sessions.tables import minute_start

Event = CreateEvent | RecordEvent | EndEvent

#: Counters every run carries, as in the ``sessions`` table.
COUNTERS = (
    "request_count",
    "error_count",
    "total_processing_time",
    "input_tokens",
    "output_tokens",
    "cost",
)


@dataclass
class Run:
    """One run of a session: the live row, or an archived row of ``session_runs``."""

    session_id: str
    run: int
    user_id: str | None
    status: str
    end_reason: str | None
    created_at: datetime
    last_activity: datetime
    ended_at: datetime | None
    metadata: dict[str, Any] | None = None
    request_count: int = 0
    error_count: int = 0
    total_processing_time: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    latency: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "run": self.run,
            "user_id": self.user_id,
            "status": self.status,
            "end_reason": self.end_reason,
            "created_at": self.created_at,
            "last_activity": self.last_activity,
            "ended_at": self.ended_at,
            "metadata": self.metadata,
            **{name: getattr(self, name) for name in COUNTERS},
        }

    def touch(self, at: datetime) -> None:
        """``at`` is activity of this run: widen its time span."""
        self.last_activity = max(self.last_activity, at)
        if self.run == 1:
            self.created_at = min(self.created_at, at)

    def add(self, event: RecordEvent) -> None:
        self.request_count += int(event.counts_request)
        self.error_count += int(event.error)
        self.total_processing_time += event.processing_time
        self.input_tokens += event.input_tokens
        self.output_tokens += event.output_tokens
        self.cost += event.cost
        if event.counts_request:
            bucket = bucket_of(event.processing_time)
            self.latency[bucket] = self.latency.get(bucket, 0) + 1
        if self.user_id is None:
            self.user_id = event.user_id


@dataclass
class ReferenceStore:
    """Live runs by session id, archived runs by (session id, run), and the batch ledger."""

    live: dict[str, Run] = field(default_factory=dict)
    archived: dict[tuple[str, int], Run] = field(default_factory=dict)
    ledger: set[uuid.UUID] = field(default_factory=set)
    #: (events, requests, errors) by minute of event time.
    minutes: dict[datetime, tuple[int, int, int]] = field(default_factory=dict)

    def apply(self, batch: Batch) -> tuple[int, int]:
        """Apply ``batch``; returns ``(applied, duplicate)`` event counts like ``ApplyResult``."""
        if batch.batch_id in self.ledger:
            return 0, len(batch.events)
        self.ledger.add(batch.batch_id)
        for event in batch.events:
            self.apply_event(event)
        return len(batch.events), 0

    def apply_all(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            self.apply(batch)

    def apply_event(self, event: Event) -> None:
        self._count_minute(event)
        live = self.live.get(event.session_id)
        if live is None:
            self._insert_first(event)
        elif isinstance(event, RecordEvent):
            if self._belongs_to_live(live, event.at):
                live.add(event)
                live.touch(event.at)
            else:
                self._add_to_earlier_run(event)
        elif isinstance(event, CreateEvent):
            self._create(live, event)
        else:
            self._end(live, event)

    def _count_minute(self, event: Event) -> None:
        minute = event.at.replace(second=0, microsecond=0)
        events, requests, errors = self.minutes.get(minute, (0, 0, 0))
        if isinstance(event, RecordEvent):
            requests += event.counts_request
            errors += event.error
        self.minutes[minute] = (events + 1, requests, errors)

    @staticmethod
    def _belongs_to_live(live: Run, at: datetime) -> bool:
        return live.run == 1 or at >= live.created_at

    def _insert_first(self, event: Event) -> None:
        ended = isinstance(event, EndEvent)
        run = Run(
            session_id=event.session_id,
            run=1,
            user_id=None if isinstance(event, EndEvent) else event.user_id,
            status=event.status if isinstance(event, EndEvent) else "active",
            end_reason="explicit" if ended else None,
            created_at=event.at,
            last_activity=event.at,
            ended_at=event.at if ended else None,
            metadata=event.metadata if isinstance(event, CreateEvent) else None,
        )
        if isinstance(event, RecordEvent):
            run.add(event)
        self.live[event.session_id] = run

    def _create(self, live: Run, event: CreateEvent) -> None:
        if live.status == "active" or (live.ended_at is not None and event.at < live.ended_at):
            if self._belongs_to_live(live, event.at):
                live.touch(event.at)
                if live.user_id is None:
                    live.user_id = event.user_id
                if live.metadata is None:
                    live.metadata = event.metadata
            return  # otherwise an earlier run's create: nothing to do
        self.archived[(live.session_id, live.run)] = replace(live)
        self.live[live.session_id] = Run(
            session_id=live.session_id,
            run=live.run + 1,
            user_id=event.user_id if event.user_id is not None else live.user_id,
            status="active",
            end_reason=None,
            created_at=event.at,
            last_activity=event.at,
            ended_at=None,
            metadata=event.metadata,
        )

    def _end(self, live: Run, event: EndEvent) -> None:
        if not self._belongs_to_live(live, event.at):
            return  # the end of an earlier run, already ended
        live.touch(event.at)
        if live.status == "active":
            live.status = event.status
            live.end_reason = "explicit"
            live.ended_at = event.at

    def _add_to_earlier_run(self, event: RecordEvent) -> None:
        runs = sorted(
            (run for (sid, _), run in self.archived.items() if sid == event.session_id),
            key=lambda run: run.run,
        )
        assert runs, "a live run after the first always has archived predecessors"
        started = [run for run in runs if run.created_at <= event.at]
        target = started[-1] if started else runs[0]
        target.add(event)
        target.last_activity = max(target.last_activity, event.at)

    # -- views compared with the store ----------------------------------------------------

    def live_rows(self) -> dict[str, dict[str, Any]]:
        """Every live row, with the minute of its activity that the idle sweep's index holds
        (not its ``error_rate_bound``, which depends on how events were cut into batches)."""
        return {
            sid: {**run.as_dict(), "last_activity_minute": minute_start(run.last_activity)}
            for sid, run in self.live.items()
        }

    def archived_rows(self) -> dict[tuple[str, int], dict[str, Any]]:
        return {key: run.as_dict() for key, run in self.archived.items()}

    def latency_rows(self) -> dict[tuple[str, int, int], int]:
        """Every run's histogram as ``session_latency`` holds it: count by (id, run, bucket)."""
        return {
            (run.session_id, run.run, bucket): count
            for run in [*self.live.values(), *self.archived.values()]
            for bucket, count in run.latency.items()
        }

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per session, over all its runs: every counter summed and the latest activity."""
        return session_totals([*self.live_rows().values(), *self.archived_rows().values()])


def exact_percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of raw samples: what ``histogram.percentile`` estimates."""
    ordered = sorted(samples)
    return ordered[math.ceil(fraction * len(ordered)) - 1]


def session_totals(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Counter sums and max ``last_activity`` per session id over run rows."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = totals.setdefault(
            row["session_id"], {**dict.fromkeys(COUNTERS, 0), "last_activity": None}
        )
        for name in COUNTERS:
            entry[name] += row[name]
        if entry["last_activity"] is None or row["last_activity"] > entry["last_activity"]:
            entry["last_activity"] = row["last_activity"]
    return totals
