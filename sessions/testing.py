"""Testing an agent's metrics without a broker or a database.

:class:`InMemoryStore` applies batches with the store's semantics, in plain Python (exactly once
by ``batch_id``, runs, late events, histograms, per-minute activity), and answers the store's
reads (:meth:`~InMemoryStore.get`, :meth:`~InMemoryStore.iter_sessions`,
:meth:`~InMemoryStore.aggregate`) with the same read models. :class:`InMemoryPublisher` is a
:class:`~sessions.publisher.Publisher` that hands each batch to such a store at once, like a
broker and a worker that never fall behind. :meth:`InMemoryStore.tracker` wires a real
:class:`~sessions.tracker.SessionTracker` to both, so an agent's own code records as in
production and a test reads back what the pipeline would have stored::

    from sessions.testing import InMemoryStore

    def test_a_failed_tool_call_counts_as_an_error():
        store = InMemoryStore()
        with store.tracker() as tracker:
            my_agent.answer(tracker, "s-1", "hello")
            tracker.flush(wait=True)  # every event applied, as against a real worker
        record = store.get("s-1")
        assert (record.request_count, record.error_count) == (2, 1)

The semantics are the store's by test: the property tests of ``tests/integration`` hold
:class:`~sessions.store.SessionStore` on SQLite and PostgreSQL to this model, batch for batch.
Nothing here imports SQLAlchemy or Celery.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sessions.client_settings import ClientSettings
from sessions.decoding import RECORDS, DecodedEvent, Record, RejectedEvent, read_batch
from sessions.errors import BrokerUnavailableError
from sessions.events import Batch, CreateEvent, EndEvent, MessageEvent
from sessions.histogram import bucket_of
from sessions.publisher import Publisher
from sessions.records import COUNTERS, Aggregate, ApplyResult, SessionRecord, percentile_fields
from sessions.settings import Settings, get_settings

if TYPE_CHECKING:
    from sessions.tracker import SessionTracker


@dataclass
class Run:
    """One run of a session: the live one, or an ended one kept in the history."""

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
    #: Requests by latency bucket (:func:`sessions.histogram.bucket_of`).
    latency: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The run as a row of the ``sessions`` (or ``session_runs``) table."""
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
            # As the ``latency`` column reads: NULL for a run without samples.
            "latency": dict(self.latency) or None,
        }

    def record(self) -> SessionRecord:
        """The run as the store's reads return it, percentiles included."""
        return SessionRecord.model_validate({**self.as_dict(), **percentile_fields(self.latency)})

    def touch(self, at: datetime) -> None:
        """``at`` is activity of this run: widen its time span."""
        self.last_activity = max(self.last_activity, at)
        if self.run == 1:
            self.created_at = min(self.created_at, at)

    def add(self, event: Record) -> None:
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
class _State:
    """What an :class:`InMemoryStore` holds."""

    live: dict[str, Run] = field(default_factory=dict)
    archived: dict[tuple[str, int], Run] = field(default_factory=dict)
    ledger: set[uuid.UUID] = field(default_factory=set)
    #: (events, requests, errors) by minute of event time.
    minutes: dict[datetime, tuple[int, int, int]] = field(default_factory=dict)
    dead_letters: list[RejectedEvent] = field(default_factory=list)


class InMemoryStore:
    """The session store's semantics in plain Python, one event at a time, thread-safe.

    It implements the rules of ``sessions/apply.py`` directly and eagerly:

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
      histogram of the run it is added to, and every applied event counts in the minute of its
      ``at``: one event, and a record's request and error.

    Events the event model refuses are set aside in :attr:`dead_letters`, as the store does.
    It is also a :class:`~sessions.confirming.Confirmer`: its ledger confirms batches.
    ``settings`` give the largest batch accepted (default: the environment's).
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._lock = threading.RLock()
        self._state = _State()

    # -- writing ----------------------------------------------------------------------------

    def apply(self, batch: Batch | Mapping[str, Any] | str) -> ApplyResult:
        """Apply one batch exactly once (a :class:`Batch`, its message or its JSON text)."""
        decoded = read_batch(batch, self.settings.store_max_batch_events)
        with self._lock:
            state = self._state
            if decoded.batch_id is None:
                state.dead_letters.extend(decoded.rejected)
                return ApplyResult(
                    rejected=len(decoded.rejected),
                    rejected_by_reason={"malformed_batch": len(decoded.rejected)},
                )
            if decoded.batch_id in state.ledger:
                return ApplyResult(duplicate=len(decoded.events) + len(decoded.rejected))
            state.ledger.add(decoded.batch_id)
            state.dead_letters.extend(decoded.rejected)
            for event in decoded.events:
                self._apply_event(event)
        rejected = len(decoded.rejected)
        return ApplyResult(
            applied=len(decoded.events),
            rejected=rejected,
            claimed=True,
            rejected_by_reason={"invalid_event": rejected} if rejected else {},
            oldest_event_at=min((event.at for event in decoded.events), default=None),
        )

    def apply_all(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            self.apply(batch)

    def _apply_event(self, event: DecodedEvent) -> None:
        self._count_minute(event)
        live = self._state.live.get(event.session_id)
        if live is None:
            self._insert_first(event)
        elif isinstance(event, RECORDS):
            if self._belongs_to_live(live, event.at):
                live.add(event)
                live.touch(event.at)
            else:
                self._add_to_earlier_run(event)
        elif isinstance(event, MessageEvent):
            # Activity of its session, never a request; the conversation is not modelled here.
            if self._belongs_to_live(live, event.at):
                live.touch(event.at)
        elif isinstance(event, CreateEvent):
            self._create(live, event)
        else:
            self._end(live, event)

    def _count_minute(self, event: DecodedEvent) -> None:
        minute = event.at.replace(second=0, microsecond=0)
        events, requests, errors = self._state.minutes.get(minute, (0, 0, 0))
        if isinstance(event, RECORDS):
            requests += event.counts_request
            errors += event.error
        self._state.minutes[minute] = (events + 1, requests, errors)

    @staticmethod
    def _belongs_to_live(live: Run, at: datetime) -> bool:
        return live.run == 1 or at >= live.created_at

    def _insert_first(self, event: DecodedEvent) -> None:
        ended = isinstance(event, EndEvent)
        run = Run(
            session_id=event.session_id,
            run=1,
            user_id=event.user_id if isinstance(event, (CreateEvent, *RECORDS)) else None,
            status=event.status if isinstance(event, EndEvent) else "active",
            end_reason="explicit" if ended else None,
            created_at=event.at,
            last_activity=event.at,
            ended_at=event.at if ended else None,
            metadata=event.metadata if isinstance(event, CreateEvent) else None,
        )
        if isinstance(event, RECORDS):
            run.add(event)
        self._state.live[event.session_id] = run

    def _create(self, live: Run, event: CreateEvent) -> None:
        if live.status == "active" or (live.ended_at is not None and event.at < live.ended_at):
            if self._belongs_to_live(live, event.at):
                live.touch(event.at)
                if live.user_id is None:
                    live.user_id = event.user_id
                if live.metadata is None:
                    live.metadata = event.metadata
            return  # otherwise an earlier run's create: nothing to do
        self._state.archived[(live.session_id, live.run)] = replace(live)
        self._state.live[live.session_id] = Run(
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

    def _add_to_earlier_run(self, event: Record) -> None:
        runs = sorted(
            (run for (sid, _), run in self._state.archived.items() if sid == event.session_id),
            key=lambda run: run.run,
        )
        assert runs, "a live run after the first always has archived predecessors"
        started = [run for run in runs if run.created_at <= event.at]
        target = started[-1] if started else runs[0]
        target.add(event)
        target.last_activity = max(target.last_activity, event.at)

    # -- reading, as the store reads ---------------------------------------------------------

    def get(self, session_id: str) -> SessionRecord | None:
        """The live run of ``session_id``; ``None`` for a session never heard of."""
        with self._lock:
            live = self._state.live.get(session_id)
            return live.record() if live is not None else None

    def iter_sessions(
        self, user_id: str | None = None, status: str | None = None
    ) -> Iterator[SessionRecord]:
        """Every matching session (its live run), ordered by id."""
        yield from (run.record() for run in self._matching(user_id, status))

    def aggregate(
        self,
        user_id: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Aggregate:
        """Totals over the matching sessions (their live runs) and the percentiles of their
        merged histograms; ``since`` / ``until`` select by last activity, ``since`` included."""
        runs = self._matching(user_id, status, since, until)
        merged: dict[int, int] = {}
        for run in runs:
            for bucket, count in run.latency.items():
                merged[bucket] = merged.get(bucket, 0) + count
        return Aggregate(
            sessions=len(runs),
            **{name: sum(getattr(run, name) for run in runs) for name in COUNTERS},
            **percentile_fields(merged),
        )

    def _matching(
        self,
        user_id: str | None,
        status: str | None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Run]:
        with self._lock:
            runs = [replace(run) for _, run in sorted(self._state.live.items())]
        return [
            run
            for run in runs
            if (user_id is None or run.user_id == user_id)
            and (status is None or run.status == status)
            and (since is None or run.last_activity >= since)
            and (until is None or run.last_activity < until)
        ]

    @property
    def dead_letters(self) -> list[RejectedEvent]:
        """What was set aside, and why (the store's ``dead_letters`` table)."""
        with self._lock:
            return list(self._state.dead_letters)

    def applied_batch_ids(self, batch_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """The ones of ``batch_ids`` in the ledger, i.e. applied."""
        with self._lock:
            return set(batch_ids) & self._state.ledger

    # -- the rows, as the tables hold them ----------------------------------------------------

    @property
    def ledger(self) -> set[uuid.UUID]:
        with self._lock:
            return set(self._state.ledger)

    @property
    def minutes(self) -> dict[datetime, tuple[int, int, int]]:
        """``(events, requests, errors)`` by minute of event time (``activity_minutes``)."""
        with self._lock:
            return dict(self._state.minutes)

    def live_rows(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {sid: run.as_dict() for sid, run in self._state.live.items()}

    def archived_rows(self) -> dict[tuple[str, int], dict[str, Any]]:
        with self._lock:
            return {key: run.as_dict() for key, run in self._state.archived.items()}

    def latency_rows(self) -> dict[tuple[str, int, int], int]:
        """Every run's histogram bucket by bucket: count by (id, run, bucket), as the rows'
        ``latency`` columns hold them."""
        with self._lock:
            runs = [*self._state.live.values(), *self._state.archived.values()]
            return {
                (run.session_id, run.run, bucket): count
                for run in runs
                for bucket, count in run.latency.items()
            }

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per session, over all its runs: every counter summed and the latest activity."""
        return session_totals([*self.live_rows().values(), *self.archived_rows().values()])

    # -- a confirmer, and a tracker wired to this store ---------------------------------------

    @property
    def where(self) -> str:
        return "the in-memory store's ledger"

    def applied(self, batch_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        return self.applied_batch_ids(batch_ids)

    def close(self) -> None:
        """Nothing to let go of."""

    def after_fork(self) -> None:
        """Nothing to forget: a forked child has its own copy."""

    def tracker(self, settings: ClientSettings | None = None, **options: Any) -> SessionTracker:
        """A :class:`~sessions.tracker.SessionTracker` whose batches this store applies at once
        (through an :class:`InMemoryPublisher`), confirmed by its ledger, with no spool.

        ``settings`` (a :class:`~sessions.client_settings.ClientSettings` or a full
        ``Settings``) default to the environment's with republishing off (nothing is ever
        lost here); ``options`` are the tracker's (``flush_interval``, ``max_batch_events``,
        ``on_unsent``, ...).
        """
        from sessions.tracker import SessionTracker

        options.setdefault("spool", None)
        return SessionTracker(
            settings or Settings(confirm_timeout_seconds=0),
            publisher=InMemoryPublisher(self),
            confirmer=self,
            **options,
        )


def session_totals(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Counter sums and the latest ``last_activity`` per session id, over run rows."""
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


class InMemoryPublisher(Publisher):
    """A :class:`~sessions.publisher.Publisher` that keeps every batch message it is given and
    hands it to ``store`` at once (a broker and a worker that never fall behind), if any.

    Set :attr:`down` to make it refuse publishes as a broker that does not answer would (the
    tracker retries, then gives the batch to its spool and ``on_unsent``).
    """

    def __init__(self, store: InMemoryStore | None = None) -> None:
        self.store = store
        #: Whether publishing fails, as with a broker that is down.
        self.down = False
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []

    def publish_text(self, text: str) -> None:
        """Keep the batch (and apply it, with a store).

        :raises BrokerUnavailableError: :attr:`down` is set.
        """
        if self.down:
            raise BrokerUnavailableError("the in-memory broker is down (InMemoryPublisher.down)")
        with self._lock:
            self._messages.append(json.loads(text))
        if self.store is not None:
            self.store.apply(text)

    def queued_messages(self) -> int:
        """None waits with a store (each is applied at once); without one, all of them."""
        with self._lock:
            return 0 if self.store is not None else len(self._messages)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every batch message published so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def events(self) -> list[dict[str, Any]]:
        """Every event published so far, in order (as the wire carries them)."""
        return [event for message in self.messages for event in message["events"]]
