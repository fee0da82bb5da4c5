"""The worker's Prometheus metrics: what ingest and the sweeps did, served by its main process.

prometheus-client keeps a process's values in that process. Celery's default pool runs tasks
in forked pool processes, so the values go to per-process files in one folder (its
*multiprocess mode*) and the main process's endpoint adds them up at each scrape. The mode is
fixed when ``prometheus_client`` is first imported, by ``PROMETHEUS_MULTIPROC_DIR``: :func:`start`
sets it and only then imports the library, in the main process before the pool forks, so every
pool process inherits both. Nothing else imports ``prometheus_client`` in a worker.

With ``SESSIONS_METRICS_PORT`` unset (0) nothing is started and each ``record_*`` call is one
``is None`` check. Every metric is observed once per batch or per sweep, never per event: in
multiprocess mode an observation is a locked write to a memory-mapped file (1.9 us for a
histogram, measured), which per event would add about a sixth to the worker's CPU per event.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from sessions.records import ApplyResult, DeadLetterReason, SweepResult
from sessions.settings import Settings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: Why the worker's consumer refused a message it could not run (logged, acknowledged, not
#: dead-lettered): a queue item of a queue not the pipeline's that was no message at all, a
#: task message Celery could not take (headers, body shape, a content type not accepted), a
#: body it could not decode, an unregistered task, a message with no task.
RefusalReason = Literal[
    "unreadable_envelope",
    "invalid_task_message",
    "undecodable_body",
    "unknown_task",
    "unknown_message",
]
#: Every value of the ``reason`` label, each exported (at 0) from the start.
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)
#: Every value of the refusals' ``reason`` label, each exported (at 0) from the start.
REFUSAL_REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)
#: Every ``(sweep, result)`` label pair: the sweeps end sessions, the health sweep also warns.
SWEEP_RESULTS = (
    ("expire_idle", "ended"),
    ("expire_older_than", "ended"),
    ("sweep_health", "ended"),
    ("sweep_health", "warned"),
)
#: Buckets of one batch's apply, seconds: a 500-event batch takes about 10 ms on PostgreSQL.
APPLY_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
#: Buckets of the event-to-commit lag, seconds: tens of ms when the worker keeps up, up to
#: hours for a spool replayed after a broker outage.
LAG_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: The files prometheus-client writes in multiprocess mode (``<type>[_<mode>]_<pid>.db``);
#: only these are removed from a configured folder at start.
FILE_PATTERNS = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")


class WorkerMetrics:
    """The metrics of one worker, and how each outcome of the store updates them.

    ``registry`` is where they are registered: ``None`` in a worker (multiprocess mode reads
    the files, not a registry), a private ``CollectorRegistry`` in tests of one process.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        counter = partial(Counter, registry=registry)
        histogram = partial(Histogram, registry=registry)
        self.events_applied = counter(
            "sessions_events_applied",
            "Events applied: counted into their sessions, in a batch this worker claimed.",
        )
        self.events_duplicate = counter(
            "sessions_events_duplicate",
            "Events skipped because their batch was already in the ledger (a redelivery).",
        )
        self.dead_letters = counter(
            "sessions_dead_letters",
            "Rows written to dead_letters: one per invalid event, one per whole payload set "
            "aside (malformed_batch, poison, cannot_apply, unexpected_error, "
            "unreadable_message, batch_id_reused).",
            ["reason"],
        )
        self.batches_applied = counter(
            "sessions_batches_applied",
            "Batches this worker claimed in the ledger (applied_batches rows it added).",
        )
        self.batches_duplicate = counter(
            "sessions_batches_duplicate",
            "Batches whose id was already in the ledger: they changed nothing.",
        )
        self.batches_reused = counter(
            "sessions_batches_reused",
            "Batches whose id the ledger holds for other content (a reused batch id): set "
            "aside whole in dead_letters (reason batch_id_reused), not applied.",
        )
        self.messages_refused = counter(
            "sessions_messages_refused",
            "Messages the worker's consumer refused without running them: logged and "
            "acknowledged, not dead-lettered.",
            ["reason"],
        )
        self.apply_seconds = histogram(
            "sessions_batch_apply_seconds",
            "Wall time of applying one batch this worker claimed: decoding, validation and "
            "its one transaction, up to the commit.",
            buckets=APPLY_SECONDS_BUCKETS,
        )
        self.commit_lag = histogram(
            "sessions_batch_commit_lag_seconds",
            "Once per applied batch: from the event time of its oldest applied event "
            "(producer clock) to the worker's clock after the commit; no event of the batch "
            "waited longer. Clocks ahead of the worker's count as 0.",
            buckets=LAG_SECONDS_BUCKETS,
        )
        self.swept = counter(
            "sessions_swept_sessions",
            "Sessions a sweep ended (result=ended), or found above the health warning rate "
            "(result=warned, counted again by every health sweep that finds them there).",
            ["sweep", "result"],
        )
        # A count of the database's, not of a process: the newest value any process set
        # wins, and a pool process that died does not take it away. No value until a sweep.
        self.active_sessions = Gauge(
            "sessions_active_sessions",
            "Sessions in status active, counted by the last sweep this worker ran.",
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self._dead_letters = {r: self.dead_letters.labels(reason=r) for r in DEAD_LETTER_REASONS}
        self._refused = {r: self.messages_refused.labels(reason=r) for r in REFUSAL_REASONS}
        self._swept = {pair: self.swept.labels(*pair) for pair in SWEEP_RESULTS}

    def applied(self, result: ApplyResult, seconds: float, committed_at: float) -> None:
        """Count one ``apply`` that took ``seconds`` and committed at ``committed_at``."""
        if result.applied:
            self.events_applied.inc(result.applied)
        if result.claimed:
            self.batches_applied.inc()
            self.apply_seconds.observe(seconds)
        elif result.reused:
            self.batches_reused.inc()
        elif not result.rejected:  # not claimed, nothing set aside: already in the ledger
            self.batches_duplicate.inc()
        if result.duplicate:
            self.events_duplicate.inc(result.duplicate)
        for reason, count in result.rejected_by_reason.items():
            self._dead_letters[reason].inc(count)
        if result.oldest_event_at is not None:
            lag = committed_at - result.oldest_event_at.timestamp()
            self.commit_lag.observe(max(0.0, lag))

    def dead_lettered(self, reason: DeadLetterReason) -> None:
        """Count one whole payload the worker set aside."""
        self._dead_letters[reason].inc()

    def refused(self, reason: RefusalReason) -> None:
        """Count one message the consumer refused."""
        self._refused[reason].inc()

    def sweep(self, result: SweepResult, active_sessions: int) -> None:
        """Count what one sweep ended or warned about; ``active_sessions`` counted after it."""
        if result.changed:
            self._swept[(result.sweep, "ended")].inc(len(result.changed))
        if result.warned:
            self._swept[(result.sweep, "warned")].inc(len(result.warned))
        self.active_sessions.set(active_sessions)


#: The metrics, once :func:`start` made them (pool processes inherit them); else ``None``.
_metrics: WorkerMetrics | None = None
#: The endpoint, in the main process only.
_server: WSGIServer | None = None
#: The temporary folder :func:`start` made for this worker, removed by :func:`stop`.
_private_dir: Path | None = None


def record_apply(result: ApplyResult, seconds: float) -> None:
    """Count one apply (a no-op unless metrics are on); call it right after ``apply`` returns."""
    if _metrics is not None:
        _metrics.applied(result, seconds, time.time())


def record_dead_letter(reason: DeadLetterReason) -> None:
    """Count one whole payload set aside by the worker (a no-op unless metrics are on)."""
    if _metrics is not None:
        _metrics.dead_lettered(reason)


def record_refusal(reason: RefusalReason) -> None:
    """Count one message the consumer refused (a no-op unless metrics are on)."""
    if _metrics is not None:
        _metrics.refused(reason)


def record_sweep(result: SweepResult, count_active: Callable[[], int]) -> None:
    """Count one sweep's outcome; ``count_active`` is only asked when metrics are on."""
    if _metrics is not None:
        _metrics.sweep(result, count_active())


def prepare_directory(configured: Path | None) -> tuple[Path, bool]:
    """The folder for this worker's metric files, holding none yet; and whether it is private.

    ``None`` makes a fresh private temporary folder (mode 0700). A configured folder is
    created if missing, and the files a previous worker left there are removed: their
    counts belong to that worker's life, and a pid reused by a new process would add to them.
    """
    if configured is None:
        return Path(tempfile.mkdtemp(prefix="sessions-metrics-")), True
    configured.mkdir(parents=True, exist_ok=True)
    for pattern in FILE_PATTERNS:
        for stale in configured.glob(pattern):
            stale.unlink(missing_ok=True)
    return configured, False


def start(settings: Settings) -> None:
    """In the worker's main process, before the pool forks: metrics on, endpoint listening.

    Does nothing when ``settings.metrics_port`` is 0. An endpoint that cannot listen (the
    port taken) is logged as an error and the worker goes on without metrics: ingest matters
    more than its figures, and the scraper sees the target down.
    """
    global _metrics, _server, _private_dir
    if settings.metrics_port == 0 or _metrics is not None:
        return
    directory, private = prepare_directory(settings.metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values

    if not getattr(values.ValueClass, "_multiprocess", False):
        # Imported before the variable was set (by a plugin, say): choose the mode again,
        # before any metric exists (prometheus-client reads ``values.ValueClass`` per metric).
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    try:
        server, _ = start_http_server(
            settings.metrics_port, settings.metrics_host, registry=registry
        )
    except OSError as exc:
        log.error(
            "metrics endpoint cannot listen on %s:%d (%s); the worker goes on without metrics",
            settings.metrics_host,
            settings.metrics_port,
            exc,
        )
        if private:
            shutil.rmtree(directory, ignore_errors=True)
        return
    _metrics, _server = WorkerMetrics(registry=None), server
    _private_dir = directory if private else None
    log.info(
        "metrics at http://%s:%d/metrics (files in %s)",
        settings.metrics_host,
        settings.metrics_port,
        directory,
    )


def after_fork() -> None:
    """In a new pool process: let go of the endpoint's listening socket it inherited.

    Only the main process serves; a pool process holding a copy of the socket would keep the
    port taken after the main process is gone.
    """
    global _server
    if _server is not None:
        _server.socket.close()
        _server = None


def process_exit() -> None:
    """In a pool process about to exit: prometheus-client's bookkeeping for a dead process.

    ``mark_process_dead`` removes the process's files of *live* gauges (which must forget
    dead processes). Counters and histograms stay: what a process counted before it was
    recycled still happened. A killed process cannot run this; none of the metrics here is
    a live gauge, so nothing is left wrong by that.
    """
    if _metrics is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def stop() -> None:
    """In the main process at shutdown: close the endpoint, remove a private folder."""
    global _metrics, _server, _private_dir
    if _server is not None:
        _server.shutdown()
        _server.server_close()
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)
    _metrics = _server = _private_dir = None
