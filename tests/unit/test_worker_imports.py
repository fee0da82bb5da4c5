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

from tests.workers_harness import run_to_completion

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


def test_the_worker_app_imports_neither_the_dashboard_nor_the_command_line(
    tmp_path: Path,
) -> None:
    done = run_to_completion(
        [sys.executable, "-c", WORKER],
        cwd=REPO_ROOT,
        env={
            "PYTHONPATH": str(REPO_ROOT),
            "SESSIONS_DATABASE_URL": f"sqlite:///{tmp_path / 'sessions.db'}",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    assert "sessions.store" in modules  # the check sees what the worker imports ...
    loaded = [m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_IN_THE_WORKER)]
    assert loaded == []  # ... and none of this
