"""The two things a new user runs first: the guide's patterns, and `sessions demo`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from examples.guide_patterns import session_pool_of, timeout_check
from sessions.context_engine import ContextEngine
from tests.integration.support import run_rows
from tests.support.guide_agent import agent_went_quiet, serve
from tests.support.services import require_postgres, require_redis, temporary_postgres_database
from tests.support.workers_harness import (
    claimed_redis_db,
    run_to_completion,
    running_pipeline,
    service_environment,
    start_worker,
    wait_until,
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


def test_the_guides_pool_and_timeout_replace_what_beats_idle_sweep_expired(
    tmp_path: Path,
) -> None:
    """A real worker and beat (idle sweep every second, the guide's 30 minutes): sessions an
    agent left an hour ago are expired by beat, then the guide's pool and timeout patterns,
    run as the guide writes them, replace them and the agent's requests go to the new runs."""
    with running_pipeline(tmp_path, beat=True, SESSIONS_IDLE_SWEEP_INTERVAL="1") as pipeline:
        store, worker = pipeline.store, pipeline.worker

        def swept(session_id: str) -> bool:
            record = store.get(session_id)
            return record is not None and (record.status, record.end_reason) == ("expired", "idle")

        def sweeps_run() -> int:
            return worker.count(r"idle sweep expired \d+ sessions")

        async def scenario(context_engine: ContextEngine) -> None:
            await agent_went_quiet(context_engine, "user-7", requests=3)
            await agent_went_quiet(context_engine, "user-123", requests=2)
            wait_until(lambda: swept("user-7") and swept("user-123"), message="beat's idle sweep")

            pooled = await session_pool_of(context_engine)("7")
            await serve(context_engine, pooled, requests=2)
            replaced = await timeout_check(context_engine, "user-123", "456")
            assert replaced is not None and replaced.session_id == "user-123-new"
            await serve(context_engine, replaced.session_id, requests=1)
            # Two more sweeps, the second sent after both new runs were applied: they stay.
            done = sweeps_run()
            wait_until(lambda: sweeps_run() >= done + 2, message="two more idle sweeps")

            session = await context_engine.get_session(pooled)
            assert session is not None and session.status == "active"
            assert (session.record.run, session.request_count) == (2, 2)
            new = await context_engine.get_session("user-123-new")
            assert new is not None and (new.status, new.request_count) == ("active", 1)
            old = await context_engine.get_session("user-123")
            assert old is not None and (old.status, old.request_count) == ("expired", 2)

        async def run() -> None:
            async with ContextEngine(pipeline.settings) as context_engine:
                await scenario(context_engine)

        asyncio.run(run())
        past = run_rows(store)
        assert list(past) == [("user-7", 1)]
        assert (past["user-7", 1]["end_reason"], past["user-7", 1]["request_count"]) == ("idle", 3)


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
