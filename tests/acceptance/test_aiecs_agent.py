"""A real, unmodified AIECS agent keeps its sessions here: the guide's Pattern 1 and Pattern 2.

``examples/aiecs_agent.py`` runs in a virtualenv of its own with aiecs 2.2.0
(``tests/support/aiecs_venv.py``: built once, kept under ``.cache/``), with a real
``HybridAgent``, a stub LLM client subclassing aiecs's ``BaseLLMClient`` and this project's
``ContextEngine``, against a live worker: on SQLite with the embedded filesystem broker, and on
PostgreSQL with Redis. What aiecs logs, what the engine returned and what the store holds are
checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import messages_table
from tests.integration.support import run_rows
from tests.support.aiecs_venv import REPO_ROOT, aiecs_python
from tests.support.services import require_postgres, require_redis, temporary_postgres_database
from tests.support.workers_harness import (
    claimed_redis_db,
    run_to_completion,
    service_environment,
    start_worker,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

#: Pattern 1's tasks, in order: each is one user turn and one answer.
TASKS = ["Hello", *(f"Request {i}" for i in range(5))]


@pytest.fixture(scope="session")
def aiecs() -> Path:
    """The Python of the aiecs virtualenv (a first build takes minutes: the hang guard above
    is for it)."""
    return aiecs_python()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a worker and its agent: SQLite with the embedded filesystem broker,
    or PostgreSQL with Redis."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            values = {
                "SESSIONS_DATABASE_URL": f"sqlite:///{tmp_path / 'sessions.db'}",
                "SESSIONS_BROKER_URL": "filesystem://",
                "SESSIONS_BROKER_DIR": str(tmp_path / "broker"),
            }
        else:
            require_postgres()
            require_redis()
            values = {
                "SESSIONS_DATABASE_URL": stack.enter_context(temporary_postgres_database("aiecs")),
                "SESSIONS_BROKER_URL": stack.enter_context(claimed_redis_db()),
            }
        yield service_environment(**values)


def run_agent(python: Path, environment: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run the example's agent; its JSON report."""
    result = run_to_completion(
        [str(python), str(REPO_ROOT / "examples" / "aiecs_agent.py")],
        cwd=cwd,
        env={**environment, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def conversation_in(prompt: list[list[str]], messages: list[list[str]]) -> list[list[str]]:
    """The entries of an LLM prompt that are conversation ``messages``, in the prompt's order
    (aiecs adds its system prompts, context and compaction markers around them)."""
    return [list(entry) for entry in prompt if list(entry) in messages]


def test_a_real_hybrid_agent_keeps_its_sessions_conversation_and_state_here(
    aiecs: Path, backend: dict[str, str], tmp_path: Path
) -> None:
    worker = start_worker(backend, tmp_path)
    try:
        agent_dir = tmp_path / "agent"
        agent_dir.mkdir()
        report = run_agent(aiecs, backend, agent_dir)
    finally:
        worker.stop()

    # Every call aiecs made on the engine worked: it logged no error (it logs one for each
    # call that raises, then falls back to its own memory).
    assert report["aiecs_errors"] == []

    # Pattern 1: created by the first task, six requests counted from the six turns, each
    # taking at least the stub's thinking time, ended as the guide ends it.
    session = report["pattern_1"]["session"]
    assert (session["status"], session["request_count"], session["error_count"]) == (
        "completed",
        6,
        0,
    )
    thinking = report["thinking_seconds"]
    assert 6 * thinking <= session["total_processing_time"] < 6 * 30
    for name in ("processing_time_p50", "processing_time_p95", "processing_time_p99"):
        assert thinking * 0.97 <= session[name] <= session["total_processing_time"]
    expected = [[role, text] for task in TASKS for role, text in (
        ("user", task),
        ("assistant", f"Answer to {task}"),
    )]
    assert report["pattern_1"]["conversation"] == expected
    # Each task's prompt held the conversation before it, read from the engine at the task's
    # start: the previous turn's messages were readable by the next turn.
    asked = [prompt for prompt in report["prompts"] if prompt[-1][1].startswith("Task: ")]
    assert [prompt[-1][1].removeprefix("Task: ") for prompt in asked] == [*TASKS, "Hello"]
    for turn, prompt in enumerate(asked[:6]):
        assert conversation_in(prompt, expected) == expected[: 2 * turn]

    # Pattern 2: the explicit create starts a new run of user-123 (the first is kept), with
    # its owner and metadata and a conversation of its own: the agent's prompt held no
    # message of the first run.
    session = report["pattern_2"]["session"]
    assert (session["run"], session["status"], session["request_count"]) == (2, "completed", 1)
    assert session["user_id"] == "user-456" and session["metadata"]["device"] == "mobile"
    assert report["pattern_2"]["conversation"] == [
        ["user", "Hello"],
        ["assistant", "Answer to Hello"],
    ]
    assert conversation_in(asked[6], expected) == []

    # A checkpoint round trip through aiecs's ContextEngineAdapter: the state saved is the
    # state loaded, both versions are listed, and the latest is the agent's own state.
    checkpoints = report["checkpoints"]
    assert checkpoints["loaded"] == checkpoints["saved"]
    assert len(checkpoints["versions"]) == 2 and checkpoints["first_version"] in checkpoints[
        "versions"
    ]
    assert checkpoints["latest_state_agent_id"] == "agent-1"

    # What the store holds, read directly: both runs, and the first run's twelve messages in
    # the order the agent gave them.
    url = backend["SESSIONS_DATABASE_URL"]
    store = SessionStore(url, settings=Settings(database_url=url))
    try:
        first = run_rows(store)[("user-123", 1)]
        assert (first["status"], first["request_count"], first["error_count"]) == (
            "completed",
            6,
            0,
        )
        m = messages_table.c
        with store.engine.connect() as connection:
            stored = connection.execute(
                select(m.role, m.content)
                .where(m.session_id == "user-123", m.run == 1)
                .order_by(m.seq, m.message_id)
            ).all()
        assert [[role, content] for role, content in stored] == expected
    finally:
        store.dispose()
