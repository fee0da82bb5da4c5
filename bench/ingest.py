"""Ingest throughput and latency, end to end, against the naive design (not a test).

P producer processes each call ``SessionTracker.record`` N times over K sessions (10% errors);
one ``celery -A workers worker`` (default pool and concurrency) applies the batches through
Redis into PostgreSQL. Measured, each as the median of ``--repeat`` runs:

* **end to end**: events per second from the first ``record`` until the database holds every
  event. The final per-session sums are checked; a run that is not exact is a failure.
* **record()**: latency p50 / p99 / max in microseconds, timed inside the producers around
  each call, during the throughput run (the worst case: every core is busy).
* **event to commit**: p50 / p99 at a fixed offered load (default 10,000 events/s). A trigger
  on ``applied_batches`` (in the bench's own database) sends ``pg_notify(batch_id)``, which
  PostgreSQL delivers at commit; the bench LISTENs, and each event's latency is the
  notification's arrival minus the event's ``at``, remembered by the producer per batch.
* **worker peak RSS**: ``VmHWM`` summed over the worker's process tree (main + pool children).

The naive baseline runs in the same invocation, on the same Redis and PostgreSQL: one Celery
task per update (``bench/naive.py``, ``celery -A bench.naive worker``), each applying one
atomic ``UPDATE`` in its own transaction. Our figures are reported as ratios against it.
Other worker set-ups run too (:data:`SCALE_CONFIGURATIONS`: one pool process, a threads pool,
two workers), ``store.apply`` alone (no broker) shows what one database connection takes, and
every run records the CPU seconds of producers, worker, PostgreSQL backends and Redis. With
``--metrics`` each repeat also runs our worker with its Prometheus endpoint on (scraped every
``--scrape-interval`` seconds; the scraped event count must equal the database's) next to the
run without, before it every other repeat, and the report gives the ratio of the two.

With ``--broker amqp://...`` every repeat also runs ours (end to end and event to commit)
through that RabbitMQ, right after the same runs through Redis, and the report sets the two
side by side as ratios against Redis measured in the same invocation (the naive baseline and
the other set-ups stay on Redis). The broker's CPU is that of the process listening on its
port (Redis: its ``INFO``), which serves any other client of that server too: a bound.

Producers are closed-loop: ``record`` never blocks, so a producer that outruns the pipeline
would only fill its buffer until events are dropped (which the exactness check would catch);
instead each producer pauses (outside the timed calls) while more than
``--max-pending`` of its events wait to be published::

    python -m bench.ingest                       # P=2, N=100,000, K=1,000, 3 repeats
    python -m bench.ingest --quick               # a smoke run, one repeat, small N
    python -m bench.ingest --producers 4 --events 50000 --sessions 10000 --repeat 5
    python -m bench.ingest --batch-events 2000 --no-scale --only-ours
    python -m bench.ingest --profile /tmp/prof   # py-spy the worker and a producer
    python -m bench.ingest --metrics --only-ours --no-latency --no-scale   # metrics on vs off
    python -m bench.ingest --burst --only-ours --no-latency --no-scale     # unpaced vs paced
    python -m bench.ingest --confirmations --only-ours --no-latency --no-scale  # marks vs none
    python -m bench.ingest --no-scale --broker amqp://guest:guest@127.0.0.1:5672/sessions-bench
    python -m bench.ingest --partitions --only-ours --no-latency --no-scale    # split sessions

With ``--confirmations`` each repeat also runs ours as before the workers marked batches on
Redis: the worker marks nothing and the producers confirm through the ledger; the
configurations table sets their CPU per event (worker's included) side by side.

With ``--burst`` each repeat also runs *unpaced* producers: agents that make their tracker
right after the start signal and at once record their N events in a plain loop, never
pausing (a backlog replayed, a batch job). They outrun the publisher; what a full buffer
cannot hold is spilled to the spool and published from there. The report gives their figures
as ratios against the paced run of the same invocation.

Prints a markdown table and writes ``bench/results/ingest-<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import platform
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sessions.publisher import Publisher

RESULTS = Path(__file__).resolve().parent / "results"
#: What a run's label says about its broker: nothing for the baseline Redis.
BROKER_SUFFIX = {"redis": "", "rabbitmq": " on RabbitMQ"}
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Every ``ERROR_EVERY``-th update of a producer is an error (10%).
ERROR_EVERY = 10
#: Seconds without progress in the database before a run is declared stuck (a failure).
STALL_TIMEOUT = 60.0
#: Seconds between looks at the database while waiting for a run to complete.
POLL = 0.01
#: The other worker set-ups measured (unless ``--no-scale``): label, processes, arguments.
SCALE_CONFIGURATIONS: list[tuple[str, int, tuple[str, ...]]] = [
    ("ours, --concurrency=1", 1, ("--concurrency=1",)),
    ("ours, --pool=threads -c 2", 1, ("--pool=threads", "--concurrency=2")),
    ("ours, 2 workers --pool=threads -c 2", 2, ("--pool=threads", "--concurrency=2")),
]
NOTIFY_CHANNEL = "bench_applied"
NOTIFY_TRIGGER = f"""
CREATE OR REPLACE FUNCTION bench_notify_applied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.batch_id::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_applied ON applied_batches;
CREATE TRIGGER bench_applied AFTER INSERT ON applied_batches
    FOR EACH ROW EXECUTE FUNCTION bench_notify_applied();
"""
DROP_TRIGGER = "DROP TRIGGER IF EXISTS bench_applied ON applied_batches"
#: Label of the runs confirmed by the ledger, the worker marking nothing (``--confirmations``).
LEDGER_CONFIRMED_LABEL = "ours, ledger confirms, no marks"
#: Label of the runs with the worker's metrics endpoint on (``--metrics``).
METRICS_LABEL = "ours, metrics on"
#: Label of the runs with unpaced producers that start their tracker with the burst (``--burst``).
BURST_LABEL = "ours, burst: fresh tracker, unpaced"
#: Empties every table our apply writes, between runs.
TRUNCATE_OURS = (
    "TRUNCATE sessions, session_runs, activity_minutes, applied_batches,"
    " dead_letters"
)


# -- the workload -------------------------------------------------------------------------


def plan(
    producer: int, events: int, sessions: int, partitions: int = 0
) -> tuple[list[str], list[float], list[bool]]:
    """Producer ``producer``'s updates: session ids, processing times and error flags.

    Deterministic, so the parent computes the exact expected sums. Processing times are
    multiples of 1/64, exact in binary floating point: their sums do not depend on the
    order in which the database adds them, so the check can demand equality. With
    ``partitions``, the sessions are split into that many partitions (``bench-k`` is in
    partition ``k % partitions``) and the producer records only into partition
    ``producer % partitions``; else every producer records into any session.
    """
    rng = random.Random(1_000_003 * producer + 17)
    if partitions:
        share = sessions // partitions
        mine = producer % partitions
        ids = [f"bench-{rng.randrange(share) * partitions + mine}" for _ in range(events)]
    else:
        ids = [f"bench-{rng.randrange(sessions)}" for _ in range(events)]
    times = [(i % 64) / 64 for i in range(events)]
    errors = [i % ERROR_EVERY == producer % ERROR_EVERY for i in range(events)]
    return ids, times, errors


def expected_totals(
    producers: int, events: int, sessions: int, partitions: int = 0
) -> dict[str, tuple[int, int, float]]:
    totals: dict[str, list[Any]] = {}
    for producer in range(producers):
        planned = plan(producer, events, sessions, partitions)
        for sid, seconds, error in zip(*planned, strict=True):
            entry = totals.setdefault(sid, [0, 0, 0.0])
            entry[0] += 1
            entry[1] += error
            entry[2] += seconds
    return {sid: (n, e, t) for sid, (n, e, t) in totals.items()}


# -- producer processes -------------------------------------------------------------------


@dataclass
class ProducerJob:
    kind: str  # "ours" or "naive"
    index: int
    events: int
    sessions: int
    broker_url: str
    database_url: str
    spool_dir: str
    #: Events per second this producer offers; 0 = as fast as the pipeline takes them.
    rate: float = 0.0
    #: Closed loop: pause while more than this many events wait to be published.
    max_pending: int = 20_000
    #: The tracker's ``max_batch_events``; None = the settings' default.
    batch_events: int | None = None
    #: ``SESSIONS_CONFIRMER`` of the producers' trackers.
    confirmer: str = "auto"
    #: Sessions split into this many partitions, the producer recording into its own (see
    #: :func:`plan`); 0 = not split.
    partitions: int = 0


class RememberingPublisher(Publisher):
    """Wraps the real publisher; remembers what it sent, for each batch's event times.

    Everything else is the real publisher's: the tracker's backlog guard on republishing
    asks it for the queue's length as it would without the wrapper.
    """

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.texts: list[str] = []

    def publish_text(self, text: str) -> None:
        self.inner.publish_text(text)
        self.texts.append(text)

    def queued_messages(self) -> int | None:
        return self.inner.queued_messages()

    def close(self) -> None:
        self.inner.close()

    def after_fork(self) -> None:
        self.inner.after_fork()

    def sent(self) -> dict[str, list[str]]:
        """``batch_id -> [at, ...]`` of every batch sent (parsed after the run)."""
        batches = [json.loads(text) for text in self.texts]
        return {str(b["batch_id"]): [event["at"] for event in b["events"]] for b in batches}


def producer_main(job: ProducerJob, barrier: Any, results: Any) -> None:
    """One producer process: record the planned updates, then report what it measured."""
    ids, times, errors, latencies = _prepare_producer(job)
    clock = time.perf_counter_ns
    tracker: Any = None
    remembering: RememberingPublisher | None = None
    if job.kind == "ours":
        from sessions.publisher import CeleryPublisher
        from sessions.settings import Settings
        from sessions.tracker import SessionTracker

        settings = Settings()
        publisher = CeleryPublisher(settings)
        remembering = RememberingPublisher(publisher) if job.rate else None
        tracker = SessionTracker(
            settings,
            publisher=remembering or publisher,
            spool=None,
            max_batch_events=job.batch_events,
        )
        record = tracker.record
    else:
        from bench import naive

        def record(session_id: str, processing_time: float, error: bool) -> None:
            naive.send(session_id, processing_time, error, datetime.now(UTC).isoformat())

    barrier.wait()
    cpu_before = time.process_time()
    started = time.time()
    start_clock = time.perf_counter()
    paused = 0.0
    for i in range(job.events):
        if job.rate:
            delay = start_clock + i / job.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        elif tracker is not None and not i & 1023:
            while tracker.stats.events_pending > job.max_pending:
                time.sleep(0.0005)
                paused += 0.0005
        before = clock()
        record(ids[i], times[i], errors[i])
        latencies[i] = clock() - before
    recorded = time.time()
    stats: dict[str, int] = {}
    if tracker is not None:
        tracker.close(timeout=300)
        publisher.close()
        stats = asdict(tracker.stats)
    sent = remembering.sent() if remembering else {}
    _report_producer(results, job, (started, recorded, paused, cpu_before), latencies, stats, sent)


def burst_producer_main(job: ProducerJob, barrier: Any, results: Any) -> None:
    """One unpaced producer (``--burst``): an agent that records a burst right after it starts.

    Its tracker is made after the start signal, with the shipped settings and the spool (where
    a full buffer spills), and the planned updates go in a plain loop, never paused.
    """
    ids, times, errors, latencies = _prepare_producer(job)
    from sessions.tracker import SessionTracker

    clock = time.perf_counter_ns
    barrier.wait()
    cpu_before = time.process_time()
    started = time.time()
    tracker = SessionTracker(max_batch_events=job.batch_events)
    record = tracker.record
    for i in range(job.events):
        before = clock()
        record(ids[i], times[i], errors[i])
        latencies[i] = clock() - before
    recorded = time.time()
    tracker.close(timeout=300)
    stats = asdict(tracker.stats)
    _report_producer(results, job, (started, recorded, 0.0, cpu_before), latencies, stats, {})


def _prepare_producer(job: ProducerJob) -> tuple[list[str], list[float], list[bool], array[int]]:
    """A producer's settings (in its environment), its planned updates, and room for timing
    each ``record`` call."""
    os.environ["SESSIONS_BROKER_URL"] = job.broker_url
    os.environ["SESSIONS_DATABASE_URL"] = job.database_url
    os.environ["SESSIONS_SPOOL_DIR"] = job.spool_dir
    os.environ["SESSIONS_CONFIRMER"] = job.confirmer
    ids, times, errors = plan(job.index, job.events, job.sessions, job.partitions)
    return ids, times, errors, array("q", bytes(8 * job.events))


def _report_producer(
    results: Any,
    job: ProducerJob,
    clocks: tuple[float, float, float, float],
    latencies: array[int],
    stats: dict[str, int],
    sent: dict[str, list[str]],
) -> None:
    """Hand the parent what a producer measured: ``clocks`` are when it started and finished
    recording (``time.time()``), the seconds it paused, and its CPU time at the start."""
    started, recorded, paused, cpu_before = clocks
    results.put(
        {
            "index": job.index,
            "started": started,
            "recorded": recorded,
            "closed": time.time(),
            "paused": paused,
            "cpu_seconds": time.process_time() - cpu_before,
            "latencies_ns": latencies.tobytes(),
            "stats": stats,
            "sent": sent,
        }
    )


# -- worker processes ---------------------------------------------------------------------


class Worker:
    """A ``celery -A <app> worker`` subprocess in a process group of its own."""

    def __init__(self, app: str, environment: dict[str, str], log: Path, *extra: str):
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                app,
                "worker",
                "--loglevel=INFO",
                f"--hostname=bench-{uuid.uuid4().hex[:8]}@%h",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                *extra,
            ],
            cwd=REPO_ROOT,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not re.search(r"@\S+ ready\.", log.read_text(errors="replace")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)

    def peak_rss_mb(self) -> tuple[float, float]:
        """(sum, largest) of ``VmHWM`` over the process tree, in MiB."""
        peaks = [_vm_hwm_kb(pid) for pid in _process_tree(self.process.pid)]
        return sum(peaks) / 1024, max(peaks, default=0) / 1024

    def pss_mb(self) -> float:
        """Proportional set size of the process tree now, in MiB: shared pages (a prefork
        child's inherited ones) counted once in all, not once per process as RSS does."""
        return sum(_pss_kb(pid) for pid in _process_tree(self.process.pid)) / 1024

    def pool_size(self) -> int:
        return len(_process_tree(self.process.pid)) - 1

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds (user + system) used so far by the main process and by its children."""
        main, *children = _process_tree(self.process.pid)
        return _cpu_seconds(main), sum(_cpu_seconds(pid) for pid in children)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


def _process_tree(pid: int) -> list[int]:
    found = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                found.extend(_process_tree(int(child)))
    return found


def _cpu_of(workers: list[Worker]) -> tuple[float, float]:
    """CPU seconds so far of the workers' main processes, and of their pool processes."""
    seconds = [w.cpu_seconds() for w in workers]
    return sum(main for main, _ in seconds), sum(pool for _, pool in seconds)


def _cpu_seconds(pid: int) -> float:
    with suppress(OSError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _pss_kb(pid: int) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _vm_hwm_kb(pid: int) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- one run ------------------------------------------------------------------------------


@dataclass
class Run:
    kind: str
    label: str
    producers: int
    events_per_producer: int
    exact: bool = False
    problem: str = ""
    seconds: float = 0.0
    events_per_second: float = 0.0
    record_us: dict[str, float] = field(default_factory=dict)
    commit_ms: dict[str, float] = field(default_factory=dict)
    worker_rss_mb: float = 0.0
    worker_rss_largest_mb: float = 0.0
    #: PSS of the worker's processes at the end of the run (shared pages counted once).
    worker_pss_mb: float = 0.0
    worker_processes: int = 0
    paused_seconds: float = 0.0
    batches: int = 0
    offered_rate: float = 0.0
    #: Events the producers' trackers spilled to the spool (a full buffer, ``--burst``).
    events_spilled: int = 0
    #: CPU seconds by component during the run (where the time goes).
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: The broker the run went through: ``redis`` (the baseline) or ``rabbitmq`` (``--broker``).
    broker: str = "redis"
    #: The producers' batch size when ``--batch-sizes`` set it for this run, else None.
    compared_batch_events: int | None = None


@dataclass
class Bench:
    producers: int
    events: int
    sessions: int
    naive_events: int
    latency_rate: float
    latency_seconds: float
    latency_warmup: float
    max_pending: int
    broker_url: str
    ours_url: str
    naive_url: str
    workdir: Path
    #: Where py-spy writes profiles of the first throughput run (``--profile``), or None.
    profile_dir: Path | None = None
    #: Extra command-line arguments for our worker (``--worker-arg``), e.g. another pool.
    worker_args: list[str] = field(default_factory=list)
    #: The producers' batch size (``--batch-events``); None = the settings' default.
    batch_events: int | None = None
    #: Seconds between scrapes of the worker's endpoint in the metrics runs.
    scrape_interval: float = 1.0
    runs: list[Run] = field(default_factory=list)
    #: The batch size a ``--batch-sizes`` comparison sets for the runs it starts, or None.
    compared_batch_events: int | None = None
    #: Sessions split into this many partitions, one per producer (``--partitions``); 0 = not.
    partitions: int = 0
    #: One broker URL (here: a Redis database, so a queue) per partition, whose producers
    #: publish there and whose own worker consumes only it; empty = one queue for all.
    partition_brokers: list[str] = field(default_factory=list)

    @contextmanager
    def split(self, partitions: int, brokers: list[str]) -> Iterator[None]:
        """Runs started inside split the sessions into ``partitions`` (one per producer); with
        ``brokers`` (one per partition) each partition has its queue and its worker."""
        assert not brokers or len(brokers) == partitions
        self.partitions, self.partition_brokers = partitions, brokers
        try:
            yield
        finally:
            self.partitions, self.partition_brokers = 0, []

    def broker_of_producer(self, index: int) -> str:
        """Where producer ``index`` publishes: its partition's queue, or the one queue."""
        if self.partition_brokers:
            return self.partition_brokers[index % self.partitions]
        return self.broker_url

    @contextmanager
    def batches_of(self, events: int) -> Iterator[None]:
        """Runs started inside have producers cutting batches of ``events`` (``--batch-sizes``)."""
        baseline, self.batch_events = self.batch_events, events
        self.compared_batch_events = events
        try:
            yield
        finally:
            self.batch_events, self.compared_batch_events = baseline, None

    @property
    def batch_suffix(self) -> str:
        n = self.compared_batch_events
        return "" if n is None else f", batches of {n:,}"

    #: Whether the worker marks settled batches on Redis (and the producers confirm by the
    #: marks); off (``--confirmations``): the ledger confirms, as before the marks.
    broker_confirmations: bool = True

    @contextmanager
    def ledger_confirmed(self) -> Iterator[None]:
        """Runs started inside confirm through the ledger, the worker marking nothing."""
        self.broker_confirmations = False
        try:
            yield
        finally:
            self.broker_confirmations = True

    @contextmanager
    def through(self, broker_url: str) -> Iterator[None]:
        """Runs started inside go through ``broker_url`` instead of the baseline Redis."""
        baseline, self.broker_url = self.broker_url, broker_url
        try:
            yield
        finally:
            self.broker_url = baseline

    @property
    def broker(self) -> str:
        return broker_kind(self.broker_url)

    # -- database helpers

    def _engine(self, url: str) -> Any:
        from sqlalchemy import create_engine

        return create_engine(url, pool_size=1, isolation_level="AUTOCOMMIT")

    def reset_ours(self) -> None:
        from sqlalchemy import text

        engine = self._engine(self.ours_url)
        with engine.connect() as c:
            c.execute(text(TRUNCATE_OURS))
            c.execute(text(DROP_TRIGGER))
        engine.dispose()

    def reset_naive(self) -> None:
        from sqlalchemy import text

        engine = self._engine(self.naive_url)
        with engine.connect() as c:
            c.execute(text("TRUNCATE sessions"))
            c.execute(
                text(
                    "INSERT INTO sessions (session_id, status, run, created_at, last_activity,"
                    " last_activity_minute) SELECT 'bench-' || n, 'active', 1, now(),"
                    " now() - interval '1 day', date_trunc('minute', now() - interval '1 day')"
                    " FROM generate_series(0, :k - 1) AS n"
                ),
                {"k": self.sessions},
            )
        engine.dispose()

    def wait_for_total(self, url: str, total: int) -> tuple[float, int]:
        """Poll until the sessions hold ``total`` requests; (wall time seen, requests)."""
        from sqlalchemy import text

        engine = self._engine(url)
        last, last_change = -1, time.monotonic()
        with engine.connect() as c:
            while True:
                seen = int(
                    c.execute(
                        text("SELECT coalesce(sum(request_count), 0) FROM sessions")
                    ).scalar_one()
                )
                now = time.time()
                if seen >= total:
                    engine.dispose()
                    return now, seen
                if seen != last:
                    last, last_change = seen, time.monotonic()
                elif time.monotonic() - last_change > STALL_TIMEOUT or self.producers_failed():
                    engine.dispose()
                    return now, seen
                time.sleep(POLL)

    def check_exact(self, url: str, producers: int, events: int) -> str:
        """Empty when every session's sums are exactly the planned ones, else the problem."""
        from sqlalchemy import text

        expected = expected_totals(producers, events, self.sessions, self.partitions)
        engine = self._engine(url)
        with engine.connect() as c:
            rows = c.execute(
                text(
                    "SELECT session_id, request_count, error_count, total_processing_time "
                    "FROM sessions"
                )
            ).all()
            dead = (
                c.execute(text("SELECT count(*) FROM dead_letters")).scalar_one()
                if url == self.ours_url
                else 0
            )
            # Ours also keeps a latency histogram per session: as many samples as requests.
            unsampled = (
                c.execute(
                    text(
                        "SELECT count(*) FROM sessions s WHERE request_count <> (SELECT"
                        " coalesce(sum(b.value), 0) FROM session_latency_buckets(s.latency) b)"
                    )
                ).scalar_one()
                if url == self.ours_url
                else 0
            )
        engine.dispose()
        actual = {r[0]: (r[1], r[2], r[3]) for r in rows if r[1] or r[0] in expected}
        wrong = [
            sid for sid in expected.keys() | actual.keys() if expected.get(sid) != actual.get(sid)
        ]
        problems = []
        if wrong:
            sample = ", ".join(
                f"{s}: want {expected.get(s)} got {actual.get(s)}" for s in sorted(wrong)[:3]
            )
            problems.append(f"{len(wrong)} sessions with wrong sums ({sample})")
        if dead:
            problems.append(f"{dead} dead letters")
        if unsampled:
            problems.append(f"{unsampled} sessions whose histogram misses requests")
        return "; ".join(problems)

    def backend_cpu_seconds(self, url: str) -> float:
        """CPU seconds of the PostgreSQL backends serving ``url``'s database (but this one)."""
        from sqlalchemy import text

        engine = self._engine(url)
        with engine.connect() as c:
            pids = c.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalars()
            total = sum(_cpu_seconds(pid) for pid in pids)
        engine.dispose()
        return total

    # -- processes

    def environment(self, database_url: str, broker_url: str | None = None) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONS_")}
        environment.update(
            PYTHONUNBUFFERED="1",
            SESSIONS_BROKER_URL=broker_url or self.broker_url,
            SESSIONS_DATABASE_URL=database_url,
            SESSIONS_SPOOL_DIR=str(self.workdir / "spool"),
        )
        if not self.broker_confirmations:
            environment.update(SESSIONS_BROKER_CONFIRMATIONS="false", SESSIONS_CONFIRMER="ledger")
        return environment

    def start_worker(
        self,
        kind: str,
        worker_args: tuple[str, ...] = (),
        metrics_port: int = 0,
        broker_url: str | None = None,
    ) -> Worker:
        extra = list(worker_args)
        if kind == "ours":
            extra += self.worker_args
            environment = self.environment(self.ours_url, broker_url)
            environment["SESSIONS_METRICS_PORT"] = str(metrics_port)
            return Worker(
                "workers",
                environment,
                self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log",
                *extra,
            )
        return Worker(
            "bench.naive",
            self.environment(self.naive_url),
            self.workdir / f"naive-{uuid.uuid4().hex[:6]}.log",
            "-Q",
            "bench.naive",
            *extra,
        )

    def start_producers(
        self, kind: str, events: int, rate: float, target: Callable[..., None] = producer_main
    ) -> None:
        context = multiprocessing.get_context("spawn")
        # Kept on self: the children unpickle them after this returns.
        self._barrier = barrier = context.Barrier(self.producers)
        self._results = results = context.Queue()
        url = self.ours_url if kind == "ours" else self.naive_url
        # A fresh spool per run, shared by its producers: what one run leaves there (batches
        # kept unconfirmed at close) must not be replayed into the next, emptied, database.
        spool = self.workdir / f"spool-{uuid.uuid4().hex[:8]}"
        processes = [
            context.Process(
                target=target,
                args=(
                    ProducerJob(
                        kind,
                        index,
                        events,
                        self.sessions,
                        self.broker_of_producer(index),
                        url,
                        str(spool),
                        rate / self.producers if rate else 0,
                        self.max_pending,
                        self.batch_events,
                        "auto" if self.broker_confirmations else "ledger",
                        self.partitions,
                    ),
                    barrier,
                    results,
                ),
            )
            for index in range(self.producers)
        ]
        for process in processes:
            process.start()
        self._producers = processes

    def producers_failed(self) -> bool:
        return any(p.exitcode not in (None, 0) for p in self._producers)

    def collect(self) -> list[dict[str, Any]]:
        collected: list[dict[str, Any]] = []
        deadline = time.monotonic() + 600
        while len(collected) < len(self._producers):
            try:
                collected.append(self._results.get(timeout=1))
            except queue.Empty:
                if self.producers_failed() or time.monotonic() > deadline:
                    codes = [p.exitcode for p in self._producers]
                    raise RuntimeError(f"producers failed (exit codes {codes})") from None
        for process in self._producers:
            process.join(60)
        return sorted(collected, key=lambda r: r["index"])

    def _profile_path(self, kind: str, role: str) -> Path:
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        return self.profile_dir / f"{kind}-{role}.txt"

    # -- scenarios

    def throughput(
        self,
        kind: str,
        workers: int = 1,
        worker_args: tuple[str, ...] = (),
        label: str = "",
        metrics: bool = False,
        burst: bool = False,
    ) -> Run:
        """End-to-end events/s with ``workers`` worker processes (extra ``worker_args``).

        With ``metrics`` (one worker) its Prometheus endpoint is on and scraped throughout;
        with ``burst`` the producers are unpaced and start their tracker with the burst.
        """
        events = self.events if kind == "ours" else self.naive_events
        run = Run(
            kind,
            (label or kind) + self.batch_suffix,
            self.producers,
            events,
            broker=self.broker,
            compared_batch_events=self.compared_batch_events,
        )
        self.reset_ours() if kind == "ours" else self.reset_naive()
        started_workers: list[Worker] = []
        profilers: list[subprocess.Popen[bytes]] = []
        scraper: Scraper | None = None
        try:
            from tests.support.workers_harness import free_port

            assert workers == 1 or not metrics, "one metrics port: one worker"
            port = free_port() if metrics else 0
            # With a queue per partition, one worker per queue (``workers`` is then per queue).
            for broker_url in self.partition_brokers or [self.broker_url]:
                for _ in range(workers):
                    started_workers.append(self.start_worker(kind, worker_args, port, broker_url))
            if metrics:
                scraper = Scraper(port, self.scrape_interval)
            worker = started_workers[0]
            run.worker_processes = sum(1 + w.pool_size() for w in started_workers)
            total = self.producers * events
            profile = self.profile_dir is not None and not any(r.kind == kind for r in self.runs)
            if profile:
                profilers.append(py_spy(worker.process.pid, self._profile_path(kind, "worker")))
            main_before, children_before = _cpu_of(started_workers)
            broker_before = broker_cpu_seconds(self.broker_url)
            self.start_producers(
                kind, events, rate=0, target=burst_producer_main if burst else producer_main
            )
            if profile:
                profilers.append(
                    py_spy(self._producers[0].pid, self._profile_path(kind, "producer"))  # type: ignore[arg-type]
                )
            url = self.ours_url if kind == "ours" else self.naive_url
            done, seen = self.wait_for_total(url, total)
            results = self.collect()
            if scraper is not None:
                run.problem = scraper.finish(total)
            peaks = [w.peak_rss_mb() for w in started_workers]
            run.worker_rss_mb = sum(total for total, _ in peaks)
            run.worker_rss_largest_mb = max(largest for _, largest in peaks)
            run.worker_pss_mb = sum(w.pss_mb() for w in started_workers)
            main_after, children_after = _cpu_of(started_workers)
            run.cpu_seconds = {
                "producers": sum(r["cpu_seconds"] for r in results),
                "worker main processes": main_after - main_before,
                "worker pool processes": children_after - children_before,
                "postgresql backends": self.backend_cpu_seconds(url),
                "broker": broker_cpu_seconds(self.broker_url) - broker_before,
            }
        finally:
            if scraper is not None:
                scraper.stop()
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)
            for profiler in profilers:
                profiler.wait(60)
            for each in started_workers:
                each.stop()
        started = min(r["started"] for r in results)
        run.seconds = done - started
        run.record_us = latency_summary(results)
        run.paused_seconds = max(r["paused"] for r in results)
        run.batches = sum(r["stats"].get("batches_sent", 0) for r in results)
        run.events_spilled = sum(r["stats"].get("events_spilled", 0) for r in results)
        problems = [run.problem]
        if seen != total:
            problems.append(f"database holds {seen} of {total} requests")
        for r in results:
            lost = {
                k: v
                for k, v in r["stats"].items()
                if k in ("events_dropped", "events_failed", "events_lost") and v
            }
            if lost:
                problems.append(f"producer {r['index']}: {lost}")
        problems.append(self.check_exact(url, self.producers, events))
        run.problem = "; ".join(p for p in problems if p)
        run.exact = not run.problem
        run.events_per_second = total / run.seconds if run.exact else 0.0
        self.runs.append(run)
        return run

    def latency(self) -> Run:
        """Event-to-commit latency at a fixed offered load (our pipeline only)."""
        from sqlalchemy import text

        warmup_events = int(self.latency_rate * self.latency_warmup / self.producers)
        events = warmup_events + int(self.latency_rate * self.latency_seconds / self.producers)
        run = Run(
            "ours",
            f"ours{BROKER_SUFFIX[self.broker]} at {self.latency_rate:,.0f} events/s"
            + self.batch_suffix,
            self.producers,
            events,
            offered_rate=self.latency_rate,
            broker=self.broker,
            compared_batch_events=self.compared_batch_events,
        )
        self.reset_ours()
        engine = self._engine(self.ours_url)
        with engine.connect() as c:
            c.exec_driver_sql(NOTIFY_TRIGGER)
        engine.dispose()
        worker = self.start_worker("ours")
        arrivals: dict[str, float] = {}
        with listening(self.ours_url, arrivals) as stop:
            try:
                run.worker_processes = worker.pool_size()
                self.start_producers("ours", events, rate=self.latency_rate)
                done, _ = self.wait_for_total(self.ours_url, self.producers * events)
                results = self.collect()
                time.sleep(0.2)  # the last notifications
                run.worker_rss_mb, run.worker_rss_largest_mb = worker.peak_rss_mb()
            finally:
                worker.stop()
                stop.set()
        engine = self._engine(self.ours_url)
        with engine.connect() as c:
            c.execute(text(DROP_TRIGGER))
        engine.dispose()
        run.problem = self.check_exact(self.ours_url, self.producers, events)
        started = min(r["started"] for r in results)
        measured_from = started + self.latency_warmup
        delays: list[float] = []
        missing = 0
        for r in results:
            for batch_id, stamps in r["sent"].items():
                arrived = arrivals.get(batch_id)
                if arrived is None:
                    missing += 1
                    continue
                for stamp in stamps:
                    at = datetime.fromisoformat(stamp).timestamp()
                    if at >= measured_from:
                        delays.append(arrived - at)
        if missing:
            run.problem = "; ".join(
                p for p in (run.problem, f"{missing} batches not notified") if p
            )
        run.exact = not run.problem
        delays.sort()
        run.commit_ms = {
            "p50": percentile(delays, 0.50) * 1000,
            "p99": percentile(delays, 0.99) * 1000,
            "max": delays[-1] * 1000 if delays else 0.0,
            "events": len(delays),
        }
        run.record_us = latency_summary(results)
        run.seconds = done - started
        run.batches = sum(len(r["sent"]) for r in results)
        self.runs.append(run)
        return run


class Scraper:
    """Reads a worker's metrics endpoint every ``interval`` seconds, as Prometheus would."""

    def __init__(self, port: int, interval: float) -> None:
        self.port = port
        self.scrapes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="bench-scrape", daemon=True
        )
        self._thread.start()

    def _run(self, interval: float) -> None:
        from tests.support.workers_harness import scrape_metrics

        while not self._stop.wait(interval):
            try:
                scrape_metrics(self.port)
                self.scrapes += 1
            except OSError as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def finish(self, total: int) -> str:
        """Stop scraping; empty when the endpoint counts ``total`` applied events, else why."""
        from tests.support.workers_harness import scrape_metrics

        self.stop()
        deadline = time.monotonic() + 30
        counted = None
        while time.monotonic() < deadline:
            counted = scrape_metrics(self.port).value("sessions_events_applied_total")
            if counted == total:
                return "; ".join(self.failures)
            time.sleep(0.05)
        return "; ".join([*self.failures, f"endpoint counts {counted} of {total} events"])


def py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` and its children, collapsed stacks (``pip install py-spy``)."""
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--gil",  # only samples holding the GIL: where the Python CPU goes, not waits
            "--format",
            "raw",
            "--rate",
            "250",
            "--nonblocking",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def listening(url: str, arrivals: dict[str, float]) -> Iterator[threading.Event]:
    """LISTEN for the trigger's notifications in a thread; arrival time per batch id."""
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    stop = threading.Event()
    ready = threading.Event()

    def listen() -> None:
        with psycopg.connect(conninfo, autocommit=True) as connection:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
            ready.set()
            while not stop.is_set():
                for notify in connection.notifies(timeout=0.1):
                    arrivals[notify.payload] = time.time()

    thread = threading.Thread(target=listen, name="bench-listen", daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield stop
    finally:
        stop.set()
        thread.join(10)


def broker_kind(url: str) -> str:
    """``rabbitmq`` for an AMQP URL, ``redis`` for a Redis one (nothing else is measured)."""
    if url.startswith(("amqp:", "amqps:", "pyamqp:")):
        return "rabbitmq"
    if url.startswith(("redis:", "rediss:")):
        return "redis"
    raise ValueError(f"--broker: must be an amqp:// or redis:// URL, got {url!r}")


def broker_cpu_seconds(url: str) -> float:
    """CPU seconds the broker's server has used (it serves other clients too: a bound)."""
    if broker_kind(url) == "redis":
        return redis_cpu_seconds(url)
    from urllib.parse import urlsplit

    pid = listening_pid(urlsplit(url).port or 5672)
    return _cpu_seconds(pid) if pid is not None else 0.0


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (``None`` if not found or not
    ours to see): RabbitMQ's Erlang VM, whose CPU time is the broker's."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    with suppress(OSError):
                        if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                            return int(entry)
    return None


def redis_cpu_seconds(url: str) -> float:
    """CPU seconds the Redis server has used (it serves other clients too: a bound)."""
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    merged: list[int] = []
    for r in results:
        values = array("q")
        values.frombytes(r["latencies_ns"])
        merged.extend(values)
    merged.sort()
    return {
        "p50": percentile(merged, 0.50) / 1000,  # type: ignore[arg-type]
        "p99": percentile(merged, 0.99) / 1000,  # type: ignore[arg-type]
        "max": merged[-1] / 1000 if merged else 0.0,
    }


# -- the store alone ----------------------------------------------------------------------


def wire_batches(sessions: int, batches: int, batch_size: int) -> list[str]:
    """``batches`` wire-form batches of ``batch_size`` records over ``sessions`` sessions, as a
    producer's tracker would publish them (10% errors)."""
    from sessions.events import RecordEvent
    from sessions.plain import batch_json, plain_record

    ids, times, errors = plan(0, batches * batch_size, sessions)
    texts: list[str] = []
    for b in range(batches):
        fields = []
        for j in range(b * batch_size, (b + 1) * batch_size):
            record = plain_record(ids[j], times[j], errors[j], None, True, 0, 0, 0.0)
            if record is None:
                # An id not seen valid lately (plain_record remembers a bounded number):
                # validated, as a tracker would, and then plainly valid.
                RecordEvent(session_id=ids[j], at=datetime.now(UTC))
                record = plain_record(ids[j], times[j], errors[j], None, True, 0, 0, 0.0)
            assert record is not None, "every bench record is valid"
            fields.append(record)
        texts.append(batch_json(uuid.uuid4(), fields))
    return texts


def apply_only(url: str, sessions: int, batches: int, batch_size: int = 500) -> dict[str, float]:
    """``SessionStore.apply`` of ready wire-form batches in this process: no broker, one
    connection. What one worker thread and one PostgreSQL backend can do, and their CPU."""
    return apply_texts(url, wire_batches(sessions, batches, batch_size), batch_size)


def apply_texts(url: str, texts: list[str], batch_size: int) -> dict[str, float]:
    """:func:`apply_only` of the given wire-form batches (the first one untimed)."""
    from sqlalchemy import text

    from sessions.settings import Settings
    from sessions.store import SessionStore

    store = SessionStore(url, settings=Settings())
    with store.engine.begin() as c:
        c.execute(text(TRUNCATE_OURS))
        c.execute(text("SELECT pg_stat_reset_single_table_counters('sessions'::regclass)"))
    store.apply(texts[0])  # connect, prepare
    with store.engine.connect() as c:
        backend = int(c.execute(text("SELECT pg_backend_pid()")).scalar_one())
    backend_before, cpu_before = _cpu_seconds(backend), time.process_time()
    started = time.perf_counter()
    for message in texts[1:]:
        store.apply(message)
    elapsed = time.perf_counter() - started
    client, server = time.process_time() - cpu_before, _cpu_seconds(backend) - backend_before
    store.dispose()  # its backend exits, and reports its statistics
    from bench.apply_alone import hot_update_fraction

    events = (len(texts) - 1) * batch_size
    return {
        "events_per_second": events / elapsed,
        "client_us_per_event": client / events * 1e6,
        "postgresql_us_per_event": server / events * 1e6,
        "sessions_hot_update_fraction": hot_update_fraction(url),
    }


# -- report ------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(bench: Bench, repeat: int, ceiling: dict[str, float] | None) -> dict[str, Any]:
    def runs(label: str) -> list[Run]:
        return [r for r in bench.runs if r.label == label and r.exact]

    ours, naive = runs("ours"), runs("naive")
    latency = [
        r
        for r in bench.runs
        if r.offered_rate and r.exact and r.broker == "redis" and r.compared_batch_events is None
    ]
    labels = list(
        dict.fromkeys(
            r.label for r in bench.runs if not r.offered_rate and r.compared_batch_events is None
        )
    )
    configurations = {
        label: {
            "events_per_second": median([r.events_per_second for r in runs(label)]),
            "worker_processes": max((r.worker_processes for r in runs(label)), default=0),
            "worker_rss_mb": median([r.worker_rss_mb for r in runs(label)]),
            "worker_pss_mb": median([r.worker_pss_mb for r in runs(label)]),
            "cpu_seconds": {
                part: median([r.cpu_seconds.get(part, 0.0) for r in runs(label)])
                for part in (runs(label) or [Run("", "", 0, 0)])[0].cpu_seconds
            },
            "events": bench.producers * (bench.events if label != "naive" else bench.naive_events),
            "runs": len(runs(label)),
        }
        for label in labels
    }
    summary: dict[str, Any] = {
        "ours_events_per_second": median([r.events_per_second for r in ours]),
        "naive_events_per_second": median([r.events_per_second for r in naive]),
        "record_us": {q: median([r.record_us[q] for r in ours]) for q in ("p50", "p99", "max")},
        "naive_record_us": {
            q: median([r.record_us[q] for r in naive]) for q in ("p50", "p99", "max")
        },
        "latency_record_us": {
            q: median([r.record_us[q] for r in latency]) for q in ("p50", "p99", "max")
        },
        "commit_ms": {q: median([r.commit_ms[q] for r in latency]) for q in ("p50", "p99")},
        "worker_rss_mb": median([r.worker_rss_mb for r in ours]),
        "worker_rss_largest_mb": median([r.worker_rss_largest_mb for r in ours]),
        "naive_worker_rss_mb": median([r.worker_rss_mb for r in naive]),
        "configurations": configurations,
        "apply_only": ceiling,
        "failures": [f"{r.label}: {r.problem}" for r in bench.runs if not r.exact],
        "repeat": repeat,
    }
    naive_rate = summary["naive_events_per_second"]
    summary["ratio"] = summary["ours_events_per_second"] / naive_rate if naive_rate else 0.0
    bursts = runs(BURST_LABEL)
    if bursts and ours:
        summary["burst"] = _burst_summary(bursts, ours)
    summary["brokers"] = broker_comparison(bench)
    summary["batch_sizes"] = batch_size_comparison(bench)
    with_metrics = runs(METRICS_LABEL)
    if with_metrics and ours:
        summary["metrics_ratio"] = median([r.events_per_second for r in with_metrics]) / median(
            [r.events_per_second for r in ours]
        )
    return summary


def ledger_confirmed(bench: Bench) -> Callable[[], Run]:
    """The throughput run of ours with the ledger confirming and no marks on Redis
    (``--confirmations``): the worker's CPU per event of each is in the configurations table."""

    def run() -> Run:
        with bench.ledger_confirmed():
            return bench.throughput("ours", label=LEDGER_CONFIRMED_LABEL)

    return run


def broker_comparison(bench: Bench) -> dict[str, dict[str, Any]]:
    """Per broker measured: end-to-end events/s, event to commit, the broker's CPU per event."""
    compared: dict[str, dict[str, Any]] = {}
    for kind, suffix in BROKER_SUFFIX.items():
        through = [r for r in bench.runs if r.label == f"ours{suffix}" and r.exact]
        latency = [r for r in bench.runs if r.offered_rate and r.exact and r.broker == kind]
        if not through and not latency:
            continue
        compared[kind] = {
            "events_per_second": median([r.events_per_second for r in through]),
            "commit_ms": {q: median([r.commit_ms[q] for r in latency]) for q in ("p50", "p99")},
            "broker_cpu_us_per_event": median([_us_per_event(r, "broker") for r in through]),
            "worker_cpu_us_per_event": median(
                [
                    _us_per_event(r, "worker main processes", "worker pool processes")
                    for r in through
                ]
            ),
            "runs": len(through),
        }
    return compared


#: The CPU parts of ``Run.cpu_seconds`` that are the worker's.
WORKER_PARTS = ("worker main processes", "worker pool processes")


def _us_per_event(run: Run, *parts: str) -> float:
    """CPU microseconds per event the run's ``parts`` used."""
    used = sum(run.cpu_seconds.get(part, 0.0) for part in parts)
    return used / (run.producers * run.events_per_producer) * 1e6


def broker_table(s: dict[str, Any], rate: str) -> list[str]:
    """The brokers side by side, each as a ratio against Redis measured in the same run."""
    brokers = s["brokers"]
    if "rabbitmq" not in brokers or "redis" not in brokers:
        return []
    base = brokers["redis"]
    lines = [
        "",
        "| broker | end to end, events/s | vs Redis | event to commit p50 / p99 at "
        f"{rate} events/s, ms | vs Redis (p99) | CPU us per event: broker / worker |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for kind, name in (("redis", "Redis"), ("rabbitmq", "RabbitMQ (quorum queues, confirms)")):
        b = brokers[kind]
        speed = (
            b["events_per_second"] / base["events_per_second"] if base["events_per_second"] else 0
        )
        p99 = b["commit_ms"]["p99"] / base["commit_ms"]["p99"] if base["commit_ms"]["p99"] else 0
        lines.append(
            f"| {name} | {b['events_per_second']:,.0f} | {speed:.2f} | "
            f"{b['commit_ms']['p50']:.0f} / {b['commit_ms']['p99']:.0f} | {p99:.2f} | "
            f"{b['broker_cpu_us_per_event']:.1f} / {b['worker_cpu_us_per_event']:.1f} |"
        )
    return lines


def _burst_summary(bursts: list[Run], paced: list[Run]) -> dict[str, Any]:
    """Unpaced producers against the paced ones of the same invocation (medians, ratios)."""

    def figures(runs: list[Run]) -> dict[str, float]:
        return {
            "events_per_second": median([r.events_per_second for r in runs]),
            **{f"record_{q}_us": median([r.record_us[q] for r in runs]) for q in RECORD_QS},
            "events_spilled": median([float(r.events_spilled) for r in runs]),
        }

    burst, baseline = figures(bursts), figures(paced)
    return {
        "burst": burst,
        "paced": baseline,
        "ratio": {k: burst[k] / baseline[k] for k in burst if baseline[k]},
    }


#: The ``record()`` latency quantiles every run reports.
RECORD_QS = ("p50", "p99", "max")


def _burst_lines(s: dict[str, Any]) -> list[str]:
    burst, paced, ratio = s["burst"]["burst"], s["burst"]["paced"], s["burst"]["ratio"]
    rows = [("end to end, events/s (sums exact)", "events_per_second", ",.0f")]
    rows += [
        (f"record() {q}, us", f"record_{q}_us", ",.0f" if q == "max" else ".1f") for q in RECORD_QS
    ]
    lines = [
        "",
        f"Unpaced producers (`--burst`: tracker made at the start signal, a plain loop, "
        f"never paused) vs paced ones (`{BURST_LABEL}` vs `ours`), medians:",
        "",
        "| measure | unpaced | paced | unpaced / paced |",
        "|---|---:|---:|---:|",
    ]
    for title, key, spec in rows:
        shown = f"{ratio[key]:.2f}" if key in ratio else "-"
        lines.append(f"| {title} | {burst[key]:{spec}} | {paced[key]:{spec}} | {shown} |")
    lines.append(f"| events spilled to the spool | {burst['events_spilled']:,.0f} | 0 | |")
    return lines


def report(bench: Bench, s: dict[str, Any], machine: dict[str, str]) -> str:
    def mark(ok: bool) -> str:
        return "yes" if ok else "**no**"

    def times(a: float, b: float) -> str:
        return f"{a / b:,.0f}x less" if a and b else "-"

    ours, naive, ratio = s["ours_events_per_second"], s["naive_events_per_second"], s["ratio"]
    rec, nrec, commit = s["record_us"], s["naive_record_us"], s["commit_ms"]
    rate = f"{bench.latency_rate:,.0f}"
    batch = f", batches of {bench.batch_events:,} events" if bench.batch_events else ""
    naive_n = f" (naive: N={bench.naive_events:,})" if naive else " (naive baseline not run)"

    def n(value: float, digits: int = 0) -> str:
        return f"{value:,.{digits}f}" if value else "-"

    lines = [
        f"Median of {s['repeat']} runs. P={bench.producers} producer processes x "
        f"N={bench.events:,} record() calls over K={bench.sessions:,} sessions, 10% errors"
        f"{batch}{naive_n}; one `celery -A workers worker` with its default "
        f"pool; Redis {machine['redis']}"
        + (f", RabbitMQ {machine['rabbitmq']}" if "rabbitmq" in machine else "")
        + f", PostgreSQL {machine['postgresql']}; "
        f"{machine['cpus']} cores ({machine['cpu']}), everything on this machine.",
        "",
        "| measure | ours | naive | ours vs naive | target | met |",
        "|---|---:|---:|---:|---|---|",
        f"| end to end, events/s (sums exact) | {ours:,.0f} | {n(naive)} | "
        f"{n(ratio, 1)}{'x' if ratio else ''} | >= 50,000 and >= 50x "
        f"| {mark(ours >= 50_000 and ratio >= 50)} |",
        f"| record() p50, us | {rec['p50']:.1f} | {n(nrec['p50'])} | "
        f"{times(nrec['p50'], rec['p50'])} | <= 10 | {mark(0 < rec['p50'] <= 10)} |",
        f"| record() p99, us | {rec['p99']:.1f} | {n(nrec['p99'])} | "
        f"{times(nrec['p99'], rec['p99'])} | <= 100 | {mark(0 < rec['p99'] <= 100)} |",
        f"| record() max, us | {rec['max']:,.0f} | {n(nrec['max'])} | | | |",
        f"| event to commit p50 at {rate} events/s, ms | {commit['p50']:.0f} | | | | |",
        f"| event to commit p99 at {rate} events/s, ms | {commit['p99']:.0f} | | | <= 500 "
        f"| {mark(0 < commit['p99'] <= 500)} |",
        f"| worker peak RSS (VmHWM summed over its processes), MB | {s['worker_rss_mb']:.0f} "
        f"| {n(s['naive_worker_rss_mb'])} | | <= 200 | {mark(0 < s['worker_rss_mb'] <= 200)} |",
        "",
        "| configuration | events/s | worker processes | worker peak RSS / PSS, MB | CPU us per "
        "event: producers / worker / PostgreSQL / broker |",
        "|---|---:|---:|---:|---|",
    ]
    for label, c in s["configurations"].items():
        cpu = c["cpu_seconds"]
        per_event = [
            cpu.get("producers", 0.0),
            cpu.get("worker main processes", 0.0) + cpu.get("worker pool processes", 0.0),
            cpu.get("postgresql backends", 0.0),
            cpu.get("broker", cpu.get("redis", 0.0)),
        ]
        shown = " / ".join(f"{v / c['events'] * 1e6:.1f}" for v in per_event) if cpu else ""
        lines.append(
            f"| {label} | {c['events_per_second']:,.0f} | {c['worker_processes']} | "
            f"{c['worker_rss_mb']:.0f} / {c['worker_pss_mb']:.0f} | {shown} |"
        )
    if s["apply_only"]:
        a = s["apply_only"]
        lines.append(
            f"| store.apply() alone: 1 process, 1 connection, no broker | "
            f"{a['events_per_second']:,.0f} | | | - / {a['client_us_per_event']:.1f} / "
            f"{a['postgresql_us_per_event']:.1f} / - |"
        )
        lines.append(
            f"\nstore.apply() alone: {a['sessions_hot_update_fraction']:.1%} of the updates of"
            " `sessions` rows were HOT (no index entry written)."
        )
    lines += broker_table(s, rate)
    lines += batch_size_table(s, rate)
    if "metrics_ratio" in s:
        lines += [
            "",
            f"Metrics on (endpoint scraped every {bench.scrape_interval:g} s) vs off, end to end: "
            f"{s['metrics_ratio']:.3f} (median events/s of each, runs interleaved).",
        ]
    if "burst" in s:
        lines += _burst_lines(s)
    if s["failures"]:
        lines += ["", "FAILED runs (not counted):"] + [f"- {f}" for f in s["failures"]]
    return "\n".join(lines)


def progress(run: Run) -> str:
    what = (
        f"commit p50 {run.commit_ms['p50']:.0f} ms p99 {run.commit_ms['p99']:.0f} ms"
        if run.offered_rate
        else f"{run.events_per_second:,.0f} events/s"
    )
    return (
        f"{run.label}: {what}, record p50 {run.record_us['p50']:.1f} us p99 "
        f"{run.record_us['p99']:.1f} us, worker RSS {run.worker_rss_mb:.0f} MB"
        + ("" if run.exact else f" FAILED: {run.problem}")
        + (
            "\n    CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in run.cpu_seconds.items())
            if run.cpu_seconds
            else ""
        )
    )


def machine_info(broker_url: str, database_url: str, amqp_url: str | None = None) -> dict[str, str]:
    import celery
    import kombu
    import redis
    from sqlalchemy import create_engine, text

    cpu = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    engine = create_engine(database_url, pool_size=1)
    with engine.connect() as c:
        postgres = c.execute(text("SHOW server_version")).scalar_one()
    engine.dispose()
    client = redis.Redis.from_url(broker_url)
    redis_version = client.info("server")["redis_version"]
    client.close()
    extra = {}
    if amqp_url is not None:
        from kombu.connection import Connection

        with Connection(amqp_url) as connection:  # type: ignore[no-untyped-call]
            connection.connect()
            version = connection.connection.server_properties.get("version", b"?")
        extra["rabbitmq"] = version.decode() if isinstance(version, bytes) else str(version)
    return extra | {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgresql": str(postgres),
        "redis": str(redis_version),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
    }


def batch_size_comparison(bench: Bench) -> dict[str, dict[str, Any]]:
    """Per batch size compared (``--batch-sizes``): end-to-end events/s, event to commit at the
    offered load and the CPU per event of worker and PostgreSQL, each the median of its runs."""
    compared: dict[str, dict[str, Any]] = {}
    sizes = dict.fromkeys(r.compared_batch_events for r in bench.runs)
    for size in (n for n in sizes if n is not None):
        mine = [r for r in bench.runs if r.compared_batch_events == size and r.exact]
        through = [r for r in mine if not r.offered_rate]
        latency = [r for r in mine if r.offered_rate]
        compared[str(size)] = {
            "events_per_second": median([r.events_per_second for r in through]),
            "events_per_second_range": [
                min((r.events_per_second for r in through), default=0.0),
                max((r.events_per_second for r in through), default=0.0),
            ],
            "commit_ms": {q: median([r.commit_ms[q] for r in latency]) for q in ("p50", "p99")},
            "commit_p99_ms_range": [
                min((r.commit_ms["p99"] for r in latency), default=0.0),
                max((r.commit_ms["p99"] for r in latency), default=0.0),
            ],
            "worker_us_per_event": median([_us_per_event(r, *WORKER_PARTS) for r in through]),
            "postgresql_us_per_event": median(
                [_us_per_event(r, "postgresql backends") for r in through]
            ),
            "runs": len(through),
        }
    return compared


def _ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else 0.0


def batch_size_table(s: dict[str, Any], rate: str) -> list[str]:
    compared = s.get("batch_sizes") or {}
    if not compared:
        return []
    base = next(iter(compared.values()))
    lines = [
        "",
        "Batch sizes compared (`--batch-sizes`, interleaved in every repeat), medians "
        "(ranges), ratios against the first size:",
        "",
        f"| batch events | end to end, events/s | vs first | event to commit p50 / p99 at "
        f"{rate} events/s, ms | p99 vs first | CPU us per event: worker / PostgreSQL |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for size, c in compared.items():
        low, high = c["events_per_second_range"]
        p99_low, p99_high = c["commit_p99_ms_range"]
        speed = _ratio(c["events_per_second"], base["events_per_second"])
        p99 = _ratio(c["commit_ms"]["p99"], base["commit_ms"]["p99"])
        lines.append(
            f"| {int(size):,} | {c['events_per_second']:,.0f} ({low:,.0f}-{high:,.0f}) | "
            f"{speed:.2f} | {c['commit_ms']['p50']:.0f} / {c['commit_ms']['p99']:.0f} "
            f"({p99_low:.0f}-{p99_high:.0f}) | {p99:.2f} | "
            f"{c['worker_us_per_event']:.1f} / {c['postgresql_us_per_event']:.1f} |"
        )
    return lines


def in_batches_of(bench: Bench, size: int, action: Callable[[], Run]) -> Callable[[], Run]:
    """``action``, with producers cutting batches of ``size`` events."""

    def run() -> Run:
        with bench.batches_of(size):
            return action()

    return run


#: Labels of the runs with the sessions split by producer (``--partitions``).
SPLIT_ONE_QUEUE_LABEL = "ours, sessions split by producer, one queue"
SPLIT_QUEUES_LABEL = "ours, sessions split by producer, a queue and a -c 1 worker each"


def split_sessions(
    bench: Bench, brokers: list[str], label: str, worker_args: tuple[str, ...] = ()
) -> Callable[[], Run]:
    """A throughput run of ours with the sessions split into one partition per producer, each
    partition through its own queue (a broker URL in ``brokers``) or, without, through one."""

    def run() -> Run:
        with bench.split(bench.producers, brokers):
            return bench.throughput("ours", 1, worker_args, label)

    return run


def through_broker(bench: Bench, url: str, action: Callable[[], Run]) -> Callable[[], Run]:
    """``action``, run through the broker at ``url`` instead of the baseline Redis."""

    def run() -> Run:
        with bench.through(url):
            return action()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--producers", "-P", type=int, default=2)
    parser.add_argument("--events", "-N", type=int, default=100_000, help="per producer")
    parser.add_argument("--sessions", "-K", type=int, default=1_000)
    parser.add_argument("--naive-events", type=int, default=2_500, help="per producer")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-rate", type=float, default=10_000, help="events/s offered")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--max-pending", type=int, default=20_000)
    parser.add_argument(
        "--no-scale", action="store_true", help="skip the other worker set-ups (see SCALE_...)"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument("--only-ours", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for our worker, e.g. --worker-arg=--pool=threads (repeatable)",
    )
    parser.add_argument(
        "--batch-events", type=int, help="producers' max_batch_events (default: the settings')"
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also run our worker with its Prometheus endpoint on, next to each run without",
    )
    parser.add_argument(
        "--scrape-interval", type=float, default=1.0, help="seconds between scrapes (--metrics)"
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="also run unpaced producers that start their tracker with the burst",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="also run ours (throughput and event to commit) through this broker, e.g. "
        "amqp://guest:guest@127.0.0.1:5672/sessions-bench, next to the Redis baseline",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        metavar="N",
        default=[],
        help="also run ours (end to end and event to commit) with producers cutting batches "
        "of each N events, interleaved in every repeat, e.g. --batch-sizes 500 1000 2000",
    )
    parser.add_argument(
        "--confirmations",
        action="store_true",
        help="also run ours confirmed by the ledger, the worker marking nothing on Redis",
    )
    parser.add_argument(
        "--partitions",
        action="store_true",
        help="also run ours with the sessions split by producer, through one queue and "
        "through a queue and a --concurrency=1 worker per producer's partition",
    )
    parser.add_argument("--quick", action="store_true", help="small N, one repeat, no scale")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the worker and a producer in the first runs, into DIR",
    )
    arguments = parser.parse_args()
    if arguments.broker is not None and broker_kind(arguments.broker) != "rabbitmq":
        parser.error("--broker: the baseline is Redis already; give an amqp:// URL")
    if arguments.quick:
        arguments.events = min(arguments.events, 20_000)
        arguments.naive_events = min(arguments.naive_events, 300)
        arguments.repeat = 1
        arguments.latency_seconds = 2.0
        arguments.no_scale = True

    from tests.support.services import temporary_postgres_database
    from tests.support.workers_harness import claimed_redis_db

    with (
        contextlib.ExitStack() as partition_claims,
        tempfile.TemporaryDirectory(prefix="bench-ingest-") as workdir,
        claimed_redis_db() as broker_url,
        temporary_postgres_database("sessions_bench_ours") as ours_url,
        temporary_postgres_database("sessions_bench_naive") as naive_url,
    ):
        from sessions.settings import Settings
        from sessions.store import SessionStore

        for url in (ours_url, naive_url):
            store = SessionStore(url, settings=Settings())
            store.upgrade()
            store.dispose()
        machine = machine_info(broker_url, ours_url, arguments.broker)
        bench = Bench(
            arguments.producers,
            arguments.events,
            arguments.sessions,
            arguments.naive_events,
            arguments.latency_rate,
            arguments.latency_seconds,
            0.5,
            arguments.max_pending,
            broker_url,
            ours_url,
            naive_url,
            Path(workdir),
            arguments.profile,
            arguments.worker_arg,
            arguments.batch_events,
            arguments.scrape_interval,
        )
        scenarios: list[Callable[[], Run]] = [lambda: bench.throughput("ours")]
        if arguments.metrics:
            scenarios.append(lambda: bench.throughput("ours", label=METRICS_LABEL, metrics=True))
        if arguments.burst:
            scenarios.append(lambda: bench.throughput("ours", label=BURST_LABEL, burst=True))
        if arguments.confirmations:
            scenarios.append(ledger_confirmed(bench))
        if not arguments.only_ours:
            scenarios.append(lambda: bench.throughput("naive"))
        if not arguments.no_latency:
            scenarios.append(bench.latency)
        if arguments.broker is not None:
            scenarios.append(
                through_broker(
                    bench,
                    arguments.broker,
                    lambda: bench.throughput("ours", label="ours on RabbitMQ"),
                )
            )
            if not arguments.no_latency:
                scenarios.append(through_broker(bench, arguments.broker, bench.latency))
        if arguments.partitions:
            brokers = [
                partition_claims.enter_context(claimed_redis_db())
                for _ in range(arguments.producers)
            ]
            scenarios += [
                split_sessions(bench, [], SPLIT_ONE_QUEUE_LABEL),
                split_sessions(bench, brokers, SPLIT_QUEUES_LABEL, ("--concurrency=1",)),
            ]
        for size in arguments.batch_sizes:
            scenarios.append(in_batches_of(bench, size, lambda: bench.throughput("ours")))
            if not arguments.no_latency:
                scenarios.append(in_batches_of(bench, size, bench.latency))
        if not arguments.no_scale:
            scenarios += [
                functools.partial(bench.throughput, "ours", workers, extra, label)
                for label, workers, extra in SCALE_CONFIGURATIONS
            ]
        for attempt in range(arguments.repeat):
            order = list(scenarios)
            if (arguments.metrics or arguments.confirmations) and attempt % 2:
                # The compared run (metrics on, or the ledger confirming) first every other
                # repeat: neither side always runs second.
                order[0], order[1] = order[1], order[0]
            for action in order:
                run = action()
                print(
                    f"[{attempt + 1}/{arguments.repeat}] {progress(run)}",
                    file=sys.stderr,
                    flush=True,
                )
        ceiling = (
            None
            if arguments.quick
            else apply_only(
                ours_url,
                arguments.sessions,
                max(20, 100_000 // (arguments.batch_events or 500)),
                arguments.batch_events or 500,
            )
        )
        summary = summarize(bench, arguments.repeat, ceiling)
    print(report(bench, summary, machine))
    if not arguments.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"ingest-{stamp}.json"
        path.write_text(
            json.dumps(
                {
                    "command": " ".join(["python -m bench.ingest", *sys.argv[1:]]),
                    "machine": machine,
                    "config": {k: v for k, v in vars(arguments).items()},
                    "summary": summary,
                    "runs": [asdict(r) for r in bench.runs],
                },
                indent=2,
            )
        )
        print(f"\n(wrote {path.relative_to(REPO_ROOT)})")
    if summary["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
