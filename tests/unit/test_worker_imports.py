"""What the worker's app imports: never the dashboard's or the command line's dependencies.

Whatever the main process imports, each prefork pool process holds too (they are forked from
it after the app is loaded), so a module the worker never runs costs its memory once per
process. The check runs in a fresh interpreter, since this test process has imported
everything already; what the imports cost is measured by ``bench.worker_memory --imports``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sessions.database import HEAD_REVISIONS
from tests.support.workers_harness import run_to_completion

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Packages of the ``dashboard`` and ``cli`` extras, and the project's modules for them.
NOT_IN_THE_WORKER = (
    "starlette",
    "jinja2",
    "uvicorn",
    "typer",
    "rich",
    "sessions.dashboard",
    "sessions.cli",
    "sessions.command",
)

#: What ``celery -A workers worker`` loads before it forks: the app and the tasks it includes.
WORKER = """
import json, sys
import workers, sessions.worker.tasks

print(json.dumps(sorted(sys.modules)))
"""


def _run_on(script: str, database: Path) -> object:
    """What ``script`` prints (JSON), run in a fresh interpreter on a SQLite store at
    ``database``."""
    done = run_to_completion(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env={
            "PYTHONPATH": str(REPO_ROOT),
            "SESSIONS_DATABASE_URL": f"sqlite:///{database}",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_worker_app_imports_neither_the_dashboard_nor_the_command_line(
    tmp_path: Path,
) -> None:
    modules = _run_on(WORKER, tmp_path / "sessions.db")
    assert isinstance(modules, list)
    assert "sessions.store" in modules  # the check sees what the worker imports ...
    loaded = [m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_IN_THE_WORKER)]
    assert loaded == []  # ... and none of this


#: The worker's start-up migration (``celeryd_after_setup`` in the main process), then what
#: the process holds; prints whether it found the schema ready, and the modules.
STARTED_WORKER = """
import json, sys
import workers, sessions.worker.tasks
from sessions.worker.celery_app import migrate_store

ready = migrate_store()
print(json.dumps({"ready": ready, "modules": sorted(sys.modules)}))
"""


def _start_worker_on(database: Path) -> dict[str, object]:
    started = _run_on(STARTED_WORKER, database)
    assert isinstance(started, dict)
    return started


def _alembic_loaded(modules: object) -> bool:
    assert isinstance(modules, list)
    return any(m == "alembic" or m.startswith("alembic.") for m in modules)


def test_a_worker_on_a_database_at_the_newest_schema_never_imports_alembic(
    tmp_path: Path,
) -> None:
    from sessions.database import require_head

    database = tmp_path / "sessions.db"
    first = _start_worker_on(database)  # an empty database: migrated, through Alembic
    assert first["ready"] is True
    assert _alembic_loaded(first["modules"])
    assert require_head(f"sqlite:///{database}")

    again = _start_worker_on(database)  # the usual start: the schema is already there
    assert again["ready"] is True
    assert not _alembic_loaded(again["modules"])


def test_a_worker_on_a_database_behind_the_newest_schema_upgrades_it(tmp_path: Path) -> None:
    from sessions.database import require_head, upgrade_schema

    database = tmp_path / "sessions.db"
    upgrade_schema(f"sqlite:///{database}", "0007")
    started = _start_worker_on(database)
    assert started["ready"] is True
    assert _alembic_loaded(started["modules"])
    assert require_head(f"sqlite:///{database}") == ", ".join(sorted(HEAD_REVISIONS))


def test_the_heads_known_without_alembic_are_alembics_own() -> None:
    from alembic.script import ScriptDirectory

    from sessions.database import _alembic_config

    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    assert set(script.get_heads()) == HEAD_REVISIONS


def test_the_head_check_reads_while_another_process_holds_sqlites_write_lock(
    tmp_path: Path,
) -> None:
    """Review: the check read in a write transaction (``BEGIN IMMEDIATE``), so a writer holding
    the lock kept a worker's start waiting out the busy timeout, then sent it through Alembic."""
    import sqlite3

    from sessions.database import at_head_revisions, upgrade_schema

    database = tmp_path / "sessions.db"
    upgrade_schema(f"sqlite:///{database}")
    writer = sqlite3.connect(database, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process's write transaction
        assert at_head_revisions(f"sqlite:///{database}") is True
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_database_that_is_away_is_said_so_by_the_head_check_itself() -> None:
    """Review: an unreachable server made the check answer ``False``, and the long way then
    connected a second time (two connect timeouts before "cannot migrate now")."""
    from sessions.database import at_head_revisions
    from sessions.errors import StoreUnavailableError
    from tests.support.workers_harness import free_port

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreUnavailableError, match="cannot reach the database"):
        at_head_revisions(url)
