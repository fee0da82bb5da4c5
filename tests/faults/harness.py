"""Real processes and reference sums for the fault scenarios.

* :class:`Fleet` starts Celery workers and beat schedulers as subprocesses (each in a process
  group of its own) and SIGKILLs every group it started when the scenario ends.
* :class:`Reference` is what the producers sent, per session; :func:`compare` reads what the
  database counts and says how many events were lost or counted twice.
* :class:`ReferenceRecorder` sends events through a real :class:`SessionTracker`, timing every
  ``record`` call (measured and reported, never asserted).
* :class:`Monitor` looks at the database from outside: open transactions, lock waits, ledger.

Nothing here sleeps to get past a race: waits are on conditions, with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from sessions.errors import BrokerUnavailableError, FlushTimeoutError
from sessions.events import Batch, RecordEvent
from sessions.plain import peek_batch_id
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.tracker import SessionTracker
from tests.faults import report
from tests.support import diagnostics
from tests.support.waiting import process_table
from tests.support.workers_harness import (
    CeleryProcess,
    service_environment,
    wait_until,
    worker_activity,
)

__all__ = ["service_environment", "wait_until"]

#: How long a scenario waits for its pipeline to settle, without progress, before it counts
#: what is missing.
SETTLE_DEADLINE = float(os.environ.get("SESSIONS_FAULTS_SETTLE", "120"))


# -- processes --------------------------------------------------------------------------------


#: ``--pool`` value that really gets a prefork pool: Celery reads ``--pool=prefork`` as "no
#: choice made" and then runs the configured ``worker_pool`` (threads) instead.
PREFORK = "processes"


def worker_arguments(
    concurrency: int, queues: str | None = None, pool: str | None = None
) -> list[str]:
    """``celery worker`` arguments; ``pool`` ``None`` runs the configured (shipped) pool."""
    arguments = [
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        f"--hostname=faults-{uuid.uuid4().hex[:8]}@%h",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]
    if queues:
        arguments += ["-Q", queues]
    if pool:
        arguments.append(f"--pool={pool}")
    return arguments


class Fleet:
    """The Celery processes of one scenario; every one is killed (by process group) at exit."""

    def __init__(self, environment: Mapping[str, str], logs: Path):
        self.environment = dict(environment)
        self.logs = logs
        self.started: list[CeleryProcess] = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_: object) -> None:
        for process in self.started:
            kill_group(process)
            process.stop()  # reaps it and closes its log

    def workers(
        self,
        count: int = 1,
        concurrency: int = 2,
        queues: str | None = None,
        pool: str | None = None,
        include: str | None = None,
    ) -> list[CeleryProcess]:
        """``count`` workers started side by side; all are consuming when this returns.

        ``include`` names a module of test code each worker imports at start (``--include``).
        """
        arguments = worker_arguments(concurrency, queues, pool)
        if include:
            arguments += ["--include", include]
        started = [
            CeleryProcess("worker", arguments, self.environment, self.logs) for _ in range(count)
        ]
        self.started += started
        for worker in started:
            worker.wait_for_log(r"@\S+ ready\.", timeout=60)
        return started

    def worker(
        self,
        concurrency: int = 2,
        queues: str | None = None,
        pool: str | None = None,
        include: str | None = None,
    ) -> CeleryProcess:
        return self.workers(1, concurrency, queues, pool, include)[0]

    def beats(self, count: int = 1) -> list[CeleryProcess]:
        started = [
            CeleryProcess(
                "beat",
                [
                    "beat",
                    "--loglevel=INFO",
                    f"--schedule={self.logs / ('beat-schedule-' + uuid.uuid4().hex[:6])}",
                    "--max-interval=1",
                ],
                self.environment,
                self.logs,
            )
            for _ in range(count)
        ]
        self.started += started
        for beat in started:
            beat.wait_for_log(r"beat: Starting", timeout=60)
        return started

    def logs_of(self, name: str) -> str:
        return "\n".join(process.log for process in self.started if process.name == name)


def kill_group(process: CeleryProcess) -> None:
    """SIGKILL a Celery process and everything in its process group (its pool children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.process.pid, signal.SIGKILL)
    process.process.wait()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a worker's pool processes)."""
    return sorted(
        each
        for each, fields in process_table().items()
        if int(fields[1]) == pid and fields[0] != "Z"
    )


def owner_of_local_port(port: int, candidates: Iterable[int]) -> int | None:
    """Which of ``candidates`` holds the TCP socket bound locally to ``port`` (or ``None``)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return pid
    return None


# -- the database, seen from outside ------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    pid: int
    client_port: int | None
    state: str | None
    wait_event_type: str | None
    query: str


class Monitor:
    """A connection of the test's own to the scenario's database."""

    def __init__(self, url: str):
        self.url = url
        self.engine = create_engine(
            url, isolation_level="AUTOCOMMIT", pool_size=2, pool_pre_ping=True
        )

    def __enter__(self) -> Monitor:
        self._source = diagnostics.register("the scenario's database, its clients", self.describe)
        return self

    def __exit__(self, *_: object) -> None:
        diagnostics.unregister(self._source)
        self.engine.dispose()

    def describe(self) -> str:
        """One line per client connection: pid, state, what it waits on, its statement."""
        return "\n".join(
            f"pid {b.pid}: {b.state} ({b.wait_event_type or 'not waiting'}): {b.query[:120]!r}"
            for b in self.backends()
        )

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def backends(self) -> list[Backend]:
        """Client connections to this database other than this one."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT pid, client_port, state, wait_event_type, query "
                    "FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
            ).all()
        return [Backend(*row) for row in rows]

    def in_transaction(self) -> list[Backend]:
        """Connections inside a transaction right now (running a statement or between two)."""
        return [
            backend
            for backend in self.backends()
            if backend.state in ("active", "idle in transaction")
        ]

    def waiting_on_locks(self, query_start: str) -> list[Backend]:
        """Statements starting with ``query_start`` that are waiting for a lock."""
        return [
            backend
            for backend in self.backends()
            if backend.wait_event_type == "Lock" and backend.query.lstrip().startswith(query_start)
        ]

    def ledger_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM applied_batches") or 0)

    def dead_letter_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM dead_letters") or 0)


# -- reference sums -------------------------------------------------------------------------


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def event_values(index: int) -> tuple[bool, int, int]:
    """(error, input tokens, output tokens) of the ``index``-th event a producer sends.

    Varied so that one lost event and one doubled event of the same session rarely cancel.
    """
    return index % 7 == 0, 1 + index % 11, index % 5


def recorded_batch(reference: Reference, session_ids: list[str], events: int, start: int) -> Batch:
    """A batch of ``events`` record events over ``session_ids``, noted in ``reference``."""
    now = datetime.now(UTC)
    items = []
    for index in range(start, start + events):
        session_id = session_ids[index % len(session_ids)]
        error, input_tokens, output_tokens = event_values(index)
        items.append(
            RecordEvent(
                session_id=session_id,
                at=now,
                error=error,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                processing_time=0.01,
            )
        )
        reference.add(session_id, error, input_tokens, output_tokens)
    return Batch(events=tuple(items))


class Reference:
    """What was sent: per session, requests, errors and tokens (thread-safe)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Counts] = {}
        self._lock = threading.Lock()

    def add(self, session_id: str, error: bool, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            counts = self.sessions.setdefault(session_id, Counts())
            counts.requests += 1
            counts.errors += error
            counts.input_tokens += input_tokens
            counts.output_tokens += output_tokens

    def merge(self, other: Mapping[str, Counts]) -> None:
        with self._lock:
            for session_id, theirs in other.items():
                ours = self.sessions.setdefault(session_id, Counts())
                ours.requests += theirs.requests
                ours.errors += theirs.errors
                ours.input_tokens += theirs.input_tokens
                ours.output_tokens += theirs.output_tokens

    @property
    def sent(self) -> int:
        with self._lock:
            return sum(counts.requests for counts in self.sessions.values())


def counted(url: str, session_ids: Sequence[str]) -> dict[str, Counts]:
    """What the database counts for ``session_ids``, live run and past runs together."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT session_id, sum(request_count), sum(error_count), "
                    "sum(input_tokens), sum(output_tokens) FROM ("
                    " SELECT session_id, request_count, error_count, input_tokens, output_tokens"
                    " FROM sessions WHERE session_id = ANY(:ids)"
                    " UNION ALL"
                    " SELECT session_id, request_count, error_count, input_tokens, output_tokens"
                    " FROM session_runs WHERE session_id = ANY(:ids)"
                    ") AS runs GROUP BY session_id"
                ),
                {"ids": list(session_ids)},
            ).all()
    finally:
        engine.dispose()
    return {row[0]: Counts(*(int(value) for value in row[1:])) for row in rows}


@dataclass
class Outcome:
    sent: int
    applied: int
    lost: int
    double: int
    #: Sessions whose requests match but whose errors or tokens do not (or vice versa).
    mismatched: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.double == 0 and not self.mismatched

    def describe(self) -> str:
        return (
            f"sent {self.sent}, counted {self.applied}: {self.lost} lost, {self.double} "
            f"double-counted, mismatched sessions {self.mismatched[:10]}"
        )


def compare(reference: Reference, url: str) -> Outcome:
    """The database's counts against ``reference``: events lost and counted twice."""
    actual = counted(url, list(reference.sessions))
    lost = double = applied = 0
    mismatched = []
    for session_id, expected in reference.sessions.items():
        got = actual.get(session_id, Counts())
        applied += got.requests
        lost += max(0, expected.requests - got.requests)
        double += max(0, got.requests - expected.requests)
        if got != expected:
            mismatched.append(session_id)
    return Outcome(reference.sent, applied, lost, double, mismatched)


def record_outcome(
    scenario: str,
    outcome: Outcome,
    began: float,
    recorder: ReferenceRecorder | None = None,
    **extra: Any,
) -> report.Row:
    """Add the scenario's row to the report (before the test asserts anything)."""
    return report.add(
        report.Row(
            scenario=scenario,
            sent=extra.pop("sent", outcome.sent),
            applied=outcome.applied,
            lost=outcome.lost,
            double=outcome.double,
            worst_record_us=None if recorder is None else recorder.worst * 1e6,
            seconds=time.monotonic() - began,
            **extra,
        )
    )


# -- producing through the real client --------------------------------------------------------


class ReferenceRecorder:
    """Sends record events through a tracker, timing each call and noting it in a reference."""

    def __init__(self, tracker: SessionTracker, reference: Reference):
        self.tracker = tracker
        self.reference = reference
        self.worst = 0.0
        self.sent = 0

    def record(self, session_id: str, index: int, at: datetime | None = None) -> None:
        error, input_tokens, output_tokens = event_values(index)
        began = time.perf_counter()
        self.tracker.record(
            session_id,
            processing_time=0.01,
            error=error,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            at=at,
        )
        self.worst = max(self.worst, time.perf_counter() - began)
        self.reference.add(session_id, error, input_tokens, output_tokens)
        self.sent += 1


class Producer(threading.Thread):
    """Records events round-robin over ``sessions`` at about ``rate`` events per second."""

    TICK = 0.01

    def __init__(self, recorder: ReferenceRecorder, sessions: Sequence[str], rate: float):
        super().__init__(name="faults-producer", daemon=True)
        self.recorder = recorder
        self.sessions = list(sessions)
        self.rate = rate
        self.halt = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        index = 0
        began = time.monotonic()
        try:
            while not self.halt.is_set():
                due = int((time.monotonic() - began) * self.rate)
                while index < due:
                    self.recorder.record(self.sessions[index % len(self.sessions)], index)
                    index += 1
                # Pacing the load (the stop signal doubles as the clock), not waiting on a race.
                self.halt.wait(self.TICK)
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        if self.failure is not None:
            raise AssertionError(f"the producer failed: {self.failure!r}") from self.failure


def agent_settings(broker_url: str, database_url: str, **values: Any) -> Settings:
    """The settings of a scenario's agents, on ``broker_url``, with ``values``.

    On Redis they name no database (``database_url`` is the workers'): the URL is left to the
    environment, which the suite points at a private SQLite file no worker ever makes, so a
    ledger could not answer and every batch is confirmed by the workers' marks on Redis. On
    RabbitMQ ``flush(wait=True)`` still reads the ledger at ``database_url``.
    """
    settings = Settings(broker_url=broker_url, **values)
    if not settings.confirms_on_redis:
        return settings.model_copy(update={"database_url": database_url})
    assert settings.database_url != database_url, "the agents must not name the database"
    return settings


def settle(
    tracker: SessionTracker, redis_client: Any = None, timeout: float = SETTLE_DEADLINE
) -> str | None:
    """Wait until every event the tracker sent is applied; the reason if that never happened.

    It gives up once ``timeout`` seconds pass without progress: neither the workers' logs
    (:func:`worker_activity`) nor the tracker's unconfirmed batches changed.
    With ``redis_client`` (a Redis client, or any broker view with an ``empty()`` method such
    as :class:`tests.faults.servers.FaultBroker`) it stops early once the broker has been empty
    (nothing queued, nothing unacknowledged, which includes retries waiting for their
    countdown) across a whole round of waiting: whatever is still unapplied then will never
    be, unless the tracker publishes unconfirmed batches again (then it waits to the deadline).
    """
    deadline = time.monotonic() + timeout
    drained_before = False
    seen = (worker_activity(), tracker.stats.batches_unconfirmed)
    while True:
        if (now := (worker_activity(), tracker.stats.batches_unconfirmed)) != seen:
            seen, deadline = now, time.monotonic() + timeout
        remaining = deadline - time.monotonic()
        try:
            tracker.flush(wait=True, timeout=max(0.1, min(remaining, 3.0)))
            return None
        except (FlushTimeoutError, BrokerUnavailableError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if remaining <= 3.0:
            return problem
        if redis_client is not None and not tracker._confirmations.republishing:
            empty = getattr(redis_client, "empty", None)
            drained = empty() if empty is not None else broker_empty(redis_client)
            if drained and drained_before:
                return f"{problem} (and the broker has nothing left to deliver)"
            drained_before = drained


def broker_empty(redis_client: Any) -> bool:
    """Nothing queued for ingest and nothing delivered but unacknowledged."""
    return int(redis_client.llen("sessions.events")) == 0 and int(redis_client.hlen("unacked")) == 0


class CorrelatingPublisher(CeleryPublisher):
    """Publishes a batch exactly as :class:`CeleryPublisher` does, under the task id ``batch_id``.

    So the worker's ``Task sessions.ingest[<id>] received`` lines name the batch, and a test can
    tell a batch no worker ever received from one a worker received and then lost.
    """

    def publish_text(self, text: str) -> None:
        self.send(text, task_id=peek_batch_id(text))


def received_by_a_worker(log: str, batch_id: object) -> bool:
    return f"sessions.ingest[{batch_id}] received" in log


# -- logs ---------------------------------------------------------------------------------------


def sweep_reports(log: str) -> dict[str, int]:
    """Sessions each kind of sweep says it ended, summed over every report in ``log``."""
    totals = {"idle": 0, "age": 0, "health": 0}
    for kind, pattern in (
        ("idle", r"idle sweep expired (\d+) sessions"),
        ("age", r"age sweep expired (\d+) sessions"),
        ("health", r"health sweep failed (\d+) sessions"),
    ):
        totals[kind] = sum(int(n) for n in re.findall(pattern, log))
    return totals


def deadline_passed(began: float, seconds: float) -> bool:
    return time.monotonic() - began >= seconds


# -- the broker, seen from outside ----------------------------------------------------------------


def _batch_id_of(raw: bytes | str) -> str | None:
    """The batch id inside one kombu Redis message (its body is base64 JSON)."""
    import base64
    import json

    with contextlib.suppress(Exception):
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        batch = json.loads(body)[0][0]
        if isinstance(batch, str):  # the wire form is the batch's JSON text
            batch = json.loads(batch)
        return str(batch["batch_id"])
    return None


def locate_batches(redis_client: Any, batch_ids: Iterable[object]) -> dict[str, str]:
    """Where each of ``batch_ids`` is in the broker: queued, unacknowledged, or nowhere."""
    wanted = {str(batch_id) for batch_id in batch_ids}
    places = dict.fromkeys(wanted, "nowhere in the broker")
    for raw in redis_client.lrange("sessions.events", 0, -1):
        found = _batch_id_of(raw)
        if found in places:
            places[found] = "queued"
    for raw in redis_client.hvals("unacked"):
        found = _batch_id_of(raw)
        if found in places:
            places[found] = "unacknowledged"
    return places


def unconfirmed_batches(tracker: SessionTracker) -> list[object]:
    """Batches the tracker published that it has not yet seen in the ledger."""
    return [entry.batch_id for entry in tracker._confirmations.unconfirmed()]
