"""The two things a new user runs first: the guide's patterns, and `sessions demo`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.services import require_postgres, require_redis, temporary_postgres_database
from tests.workers_harness import (
    claimed_redis_db,
    run_to_completion,
    service_environment,
    start_worker,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: The guide's patterns, in the order examples/guide_patterns.py runs them.
PATTERNS = (
    "basic_lifecycle",
    "explicit_creation",
    "status_management",
    "identification",
    "request_tracking",
    "manual_updates",
    "aggregation",
    "performance_monitoring",
    "automatic_cleanup",
    "custom_cleanup",
    "cleanup_by_age",
    "error_tracking",
    "error_recovery",
    "health_monitoring",
    "session_limits",
    "session_timeout",
    "session_pooling",
)


@pytest.fixture
def production_environment() -> Iterator[dict[str, str]]:
    require_redis()
    require_postgres()
    with ExitStack() as stack:
        yield service_environment(
            SESSIONS_BROKER_URL=stack.enter_context(claimed_redis_db()),
            SESSIONS_DATABASE_URL=stack.enter_context(temporary_postgres_database("guide")),
        )


def test_every_guide_pattern_runs_against_a_real_worker(
    production_environment: dict[str, str], tmp_path: Path
) -> None:
    worker = start_worker(production_environment, tmp_path)
    try:
        result = run_to_completion(
            [sys.executable, str(ROOT / "examples" / "guide_patterns.py")],
            env=production_environment,
        )
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert tuple(passed) == PATTERNS


def test_the_demo_runs_end_to_end_on_the_embedded_default(tmp_path: Path) -> None:
    """`make demo` with nothing configured: SQLite and the filesystem broker, in a new folder."""
    result = run_to_completion(
        [sys.executable, "-m", "sessions.cli", "demo", "--sessions", "30", "--requests", "20"],
        cwd=tmp_path,
        env=service_environment(COLUMNS="200"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "sqlite:///" in out and "filesystem://" in out
    assert "applied: exact" in out
    for status in ("completed", "expired", "failed"):
        assert status in out
    assert list(tmp_path.glob(".demo/*/sessions.db")), "the demo keeps its database in .demo/"
