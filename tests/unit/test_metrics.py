"""The worker's Prometheus metrics: what each outcome counts, the multiprocess folder, forks.

The metrics of one process are read from a private registry; the multiprocess mode a worker
runs in is exercised in a process of its own (``tests/unit/metrics_fork.py``) and read over
HTTP, as Prometheus reads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sessions.records import ApplyResult, SweepResult
from sessions.settings import Settings
from sessions.worker import metrics
from sessions.worker.metrics import DEAD_LETTER_REASONS, WorkerMetrics, prepare_directory
from tests.support.workers_harness import REPO_ROOT, free_port, scrape_metrics
from tests.unit.metrics_fork import ACTIVE, EVENTS

COMMITTED_AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def recorded(registry: CollectorRegistry) -> WorkerMetrics:
    return WorkerMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def apply(recorded: WorkerMetrics, result: ApplyResult, seconds: float = 0.02) -> None:
    recorded.applied(result, seconds, COMMITTED_AT.timestamp())


def test_every_reason_and_sweep_result_is_exported_at_zero(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    for reason in DEAD_LETTER_REASONS:
        assert value(registry, "sessions_dead_letters_total", reason=reason) == 0
    for sweep, result in metrics.SWEEP_RESULTS:
        assert value(registry, "sessions_swept_sessions_total", sweep=sweep, result=result) == 0


def test_a_claimed_batch_counts_its_events_time_lag_and_dead_letters(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    result = ApplyResult(
        applied=3,
        rejected=2,
        claimed=True,
        rejected_by_reason={"invalid_event": 1, "refused_by_database": 1},
        oldest_event_at=COMMITTED_AT - timedelta(seconds=2),
    )
    apply(recorded, result, seconds=0.02)
    assert value(registry, "sessions_events_applied_total") == 3
    assert value(registry, "sessions_batches_applied_total") == 1
    assert value(registry, "sessions_batches_duplicate_total") == 0
    assert value(registry, "sessions_events_duplicate_total") == 0
    assert value(registry, "sessions_dead_letters_total", reason="invalid_event") == 1
    assert value(registry, "sessions_dead_letters_total", reason="refused_by_database") == 1
    assert value(registry, "sessions_dead_letters_total", reason="malformed_batch") == 0
    assert value(registry, "sessions_batch_apply_seconds_count") == 1
    assert value(registry, "sessions_batch_apply_seconds_sum") == 0.02
    assert value(registry, "sessions_batch_apply_seconds_bucket", le="0.01") == 0
    assert value(registry, "sessions_batch_apply_seconds_bucket", le="0.025") == 1
    assert value(registry, "sessions_batch_commit_lag_seconds_sum") == 2.0
    assert value(registry, "sessions_batch_commit_lag_seconds_bucket", le="1.0") == 0
    assert value(registry, "sessions_batch_commit_lag_seconds_bucket", le="2.5") == 1


def test_a_duplicate_batch_counts_as_duplicate_only(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    apply(recorded, ApplyResult(duplicate=4))
    assert value(registry, "sessions_events_duplicate_total") == 4
    assert value(registry, "sessions_batches_duplicate_total") == 1
    assert value(registry, "sessions_events_applied_total") == 0
    assert value(registry, "sessions_batches_applied_total") == 0
    assert value(registry, "sessions_batch_apply_seconds_count") == 0
    assert value(registry, "sessions_batch_commit_lag_seconds_count") == 0


def test_a_malformed_batch_is_a_dead_letter_not_a_batch(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    apply(recorded, ApplyResult(rejected=1, rejected_by_reason={"malformed_batch": 1}))
    assert value(registry, "sessions_dead_letters_total", reason="malformed_batch") == 1
    assert value(registry, "sessions_batches_applied_total") == 0
    assert value(registry, "sessions_batches_duplicate_total") == 0


def test_a_claimed_batch_without_applied_events_has_no_lag(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    apply(recorded, ApplyResult(rejected=1, claimed=True, rejected_by_reason={"invalid_event": 1}))
    assert value(registry, "sessions_batches_applied_total") == 1
    assert value(registry, "sessions_batch_commit_lag_seconds_count") == 0


def test_an_event_from_a_clock_ahead_lags_zero(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    ahead = ApplyResult(applied=1, claimed=True, oldest_event_at=COMMITTED_AT + timedelta(1))
    apply(recorded, ahead)
    assert value(registry, "sessions_batch_commit_lag_seconds_count") == 1
    assert value(registry, "sessions_batch_commit_lag_seconds_sum") == 0


def test_whole_payloads_set_aside_by_the_worker_count_by_reason(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    for reason in ("poison", "cannot_apply", "cannot_apply", "unexpected_error"):
        recorded.dead_lettered(reason)
    assert value(registry, "sessions_dead_letters_total", reason="poison") == 1
    assert value(registry, "sessions_dead_letters_total", reason="cannot_apply") == 2
    assert value(registry, "sessions_dead_letters_total", reason="unexpected_error") == 1


def test_sweeps_count_ended_and_warned_sessions_and_set_the_active_gauge(
    recorded: WorkerMetrics, registry: CollectorRegistry
) -> None:
    recorded.sweep(SweepResult(sweep="expire_idle", changed=("a", "b")), active_sessions=7)
    recorded.sweep(SweepResult(sweep="sweep_health", changed=("c",), warned=("d", "e", "f")), 5)
    recorded.sweep(SweepResult(sweep="expire_older_than"), active_sessions=4)

    def swept(sweep: str, result: str) -> float | None:
        return value(registry, "sessions_swept_sessions_total", sweep=sweep, result=result)

    assert swept("expire_idle", "ended") == 2
    assert swept("sweep_health", "ended") == 1
    assert swept("sweep_health", "warned") == 3
    assert swept("expire_older_than", "ended") == 0
    assert value(registry, "sessions_active_sessions") == 4


def test_recording_is_a_no_op_while_metrics_are_off() -> None:
    assert metrics._metrics is None
    asked: list[str] = []

    def count_active() -> int:
        asked.append("count")
        return 0

    metrics.record_apply(ApplyResult(applied=1, claimed=True), 0.1)
    metrics.record_dead_letter("poison")
    metrics.record_sweep(SweepResult(sweep="expire_idle"), count_active)
    assert asked == []  # the store is not even asked to count


def test_metrics_are_off_by_default_and_the_endpoint_is_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("PORT", "HOST", "DIR"):
        monkeypatch.delenv(f"SESSIONS_METRICS_{name}", raising=False)
    settings = Settings()
    assert (settings.metrics_port, settings.metrics_host, settings.metrics_dir) == (
        0,
        "127.0.0.1",
        None,
    )
    metrics.start(settings)
    assert metrics._metrics is None


# -- the multiprocess folder -------------------------------------------------------------


def test_without_a_configured_folder_each_worker_gets_a_fresh_private_one() -> None:
    first, first_private = prepare_directory(None)
    second, second_private = prepare_directory(None)
    try:
        assert first != second and first_private and second_private
        assert list(first.iterdir()) == []
        assert first.stat().st_mode & 0o777 == 0o700
    finally:
        first.rmdir()
        second.rmdir()


def test_a_configured_folder_is_created_and_emptied_of_stale_metric_files(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    assert prepare_directory(folder) == (folder, False)
    assert folder.is_dir()
    stale = ["counter_12.db", "gauge_mostrecent_12.db", "gauge_livesum_13.db", "histogram_12.db"]
    for name in [*stale, "notes.txt", "other.db"]:
        (folder / name).write_text("x")
    prepare_directory(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "other.db"]


# -- a worker's processes, for real ------------------------------------------------------


@pytest.fixture(params=["worker import", "imported before"])
def forking_worker(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    flags = ["--import-first"] if request.param == "imported before" else []
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.metrics_fork", str(port), *flags],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, port
    finally:
        process.kill()
        process.wait()


def _next_line(process: subprocess.Popen[str], proceed: bool = False) -> list[str]:
    assert process.stdin is not None and process.stdout is not None
    if proceed:
        process.stdin.write("go\n")
        process.stdin.flush()
    line = process.stdout.readline()
    assert line, f"the worker stand-in exited with {process.wait()}"
    return line.split(" ", 1)


def test_pool_processes_counts_add_up_at_the_main_processes_endpoint(
    forking_worker: tuple[subprocess.Popen[str], int],
) -> None:
    process, port = forking_worker
    assert _next_line(process) == ["started\n"]
    before = scrape_metrics(port)
    assert before.content_type.startswith("text/plain")
    assert before.value("sessions_events_applied_total") == 0
    assert before.value("sessions_active_sessions") is None  # no sweep has counted yet

    word, files = _next_line(process, proceed=True)
    assert word == "ready"
    assert not [name for name in json.loads(files) if name.startswith("gauge_live")]
    after = scrape_metrics(port)
    assert after.value("sessions_events_applied_total") == EVENTS * len(ACTIVE)
    assert after.value("sessions_batches_applied_total") == len(ACTIVE)
    assert after.value("sessions_batch_apply_seconds_count") == len(ACTIVE)
    assert after.value("sessions_batch_commit_lag_seconds_count") == len(ACTIVE)
    ended = after.value("sessions_swept_sessions_total", sweep="expire_idle", result="ended")
    assert ended == sum(range(1, len(ACTIVE) + 1))
    assert after.value("sessions_active_sessions") == ACTIVE[-1]  # the most recent count

    assert _next_line(process, proceed=True) == ["stopped", "false\n"]  # private folder removed
