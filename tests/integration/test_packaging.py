"""The distribution next to another application: only ``sessions`` goes on ``sys.path``.

A wheel is built from a copy of the checkout (``pip wheel --no-deps``, so a stale ``build/`` of
the checkout cannot leak into it) and installed into fresh virtualenvs, one with the base
install and one with the ``worker`` extra, their dependencies from pip's index and cache (about
15 s each here). A dummy Celery application has modules named as this repository's top level
(``celeryconfig``, ``workers``, ``migrations``), put on ``sys.path`` *after* site-packages, so a
wheel shipping any of those names would shadow them and fail these tests.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.support.workers_harness import REPO_ROOT, run_to_completion

pytestmark = [pytest.mark.slow]

#: What an application of its own has at its top level, each module saying whose it is.
APP_MODULES = {
    "celeryconfig.py": "WHO = 'app'\nbroker_url = 'memory://'\n",
    "workers/__init__.py": "WHO = 'app'\n",
    "migrations/__init__.py": "WHO = 'app'\n",
}
#: Seconds without progress before a build or an install is given up (pip resolving on a busy
#: machine is slow, and only a stall should fail).
STALL = 300.0


def _checkout_copy(target: Path) -> Path:
    """The checkout as git would give it: no virtualenv, build output or caches."""
    shutil.copytree(
        REPO_ROOT,
        target,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache", ".cache", ".demo",
            "node_modules", "sessions.db*", ".sessions-broker",
        ),
    )
    return target


def _run(arguments: list[str], cwd: Path) -> str:
    done = run_to_completion(arguments, timeout=STALL, cwd=cwd)
    assert done.returncode == 0, f"{arguments}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = _checkout_copy(work / "checkout")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), "."], source)
    (built,) = work.glob("agent_sessions-*.whl")
    return built


def _venv(wheel: Path, where: Path, extras: str = "") -> Path:
    _run([sys.executable, "-m", "venv", str(where)], where.parent)
    python = where / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", f"{wheel}{extras}"], where.parent)
    return python


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    app = tmp_path_factory.mktemp("app")
    for name, text in APP_MODULES.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return app


def _in_app(python: Path, app: Path, code: str) -> dict[str, object]:
    """Run ``code`` (it prints one JSON object) with the application after site-packages on
    ``sys.path`` and nothing of the checkout on it (``-P``: not even the current directory)."""
    prelude = f"import json, sys\nsys.path.append({str(app)!r})\n"
    out = _run([str(python), "-P", "-c", prelude + textwrap.dedent(code)], app.parent)
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


#: The application's modules, imported as the application would.
WHOSE = """
    import celeryconfig, migrations, workers
    whose = {m.__name__: (m.WHO, m.__file__.startswith(sys.path[-1]))
             for m in (celeryconfig, migrations, workers)}
"""


def test_the_wheel_holds_only_the_sessions_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"sessions", _dist_info(wheel)}
    # What moved inside the package, with its data files.
    for inside in (
        "sessions/worker/celery_app.py",
        "sessions/worker/config.py",
        "sessions/worker/tasks.py",
        "sessions/migrations/env.py",
        "sessions/migrations/script.py.mako",
        "sessions/migrations/versions/0001_initial_schema.py",
        "sessions/dashboard/templates/base.html",
        "sessions/wire.schema.json",
    ):
        assert inside in names, inside


def _dist_info(wheel: Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{name}-{version}.dist-info"


def test_the_base_install_records_and_leaves_the_applications_modules_alone(
    wheel: Path, app_dir: Path, tmp_path: Path
) -> None:
    python = _venv(wheel, tmp_path / "client")
    seen = _in_app(
        python,
        app_dir,
        WHOSE
        + """
    from importlib.util import find_spec
    from sessions import SessionTracker
    from sessions.settings import Settings

    tracker = SessionTracker(Settings(broker_url="memory://", confirm_timeout_seconds=0))
    tracker.record("s-1", processing_time=0.1)
    tracker.close()
    print(json.dumps({"whose": whose, "sent": tracker.stats.batches_sent,
                      "heavy": [m for m in ("sqlalchemy", "alembic", "starlette",
                                            "prometheus_client", "typer", "celery",
                                            "billiard", "click") if find_spec(m)]}))
    """,
    )
    assert seen == {
        "whose": {name: ["app", True] for name in ("celeryconfig", "migrations", "workers")},
        "sent": 1,
        "heavy": [],  # the base install is the client only
    }
    # The console script is installed with the client; a command says which extra it needs.
    command = run_to_completion([str(python.parent / "sessions"), "schema"], timeout=STALL)
    assert command.returncode == 1, command.stderr
    assert "needs the 'cli' extra" in command.stderr, command.stderr
    assert "pip install '.[cli]'" in command.stderr, command.stderr
    assert "Traceback" not in command.stderr


def test_the_worker_extra_runs_its_app_and_migrations_from_the_package(
    wheel: Path, app_dir: Path, tmp_path: Path
) -> None:
    python = _venv(wheel, tmp_path / "worker", "[worker]")
    database = tmp_path / "store.db"
    seen = _in_app(
        python,
        app_dir,
        WHOSE
        + f"""
    from celery.app.utils import find_app
    from sessions.database import MIGRATIONS_DIR, require_head, upgrade_schema

    pipeline = find_app("sessions.worker")  # what `celery -A sessions.worker worker` finds
    pipeline.loader.import_default_modules()
    url = "sqlite:///{database}"
    upgrade_schema(url)
    print(json.dumps({{
        "whose": whose,
        "tasks": sorted(t for t in pipeline.tasks if t.startswith("sessions.")),
        "consumer": pipeline.conf.worker_consumer,
        "migrations": str(MIGRATIONS_DIR).startswith(sys.prefix),
        "head": require_head(url),
    }}))
    """,
    )
    assert seen.pop("whose") == {
        name: ["app", True] for name in ("celeryconfig", "migrations", "workers")
    }
    assert seen == {
        "tasks": [
            "sessions.expire_idle",
            "sessions.expire_older_than",
            "sessions.ingest",
            "sessions.purge",
            "sessions.set_aside",
            "sessions.sweep_health",
        ],
        "consumer": "sessions.worker.consumer:Consumer",
        "migrations": True,  # the package's own, in the virtualenv
        "head": seen["head"],
    }
    assert seen["head"], "the schema is at a revision after the upgrade"
    # The command line, run from the application's directory, whose own celeryconfig is there:
    # the pipeline's app reads its own configuration, never the application's.
    report = run_to_completion(
        [str(python.parent / "celery"), "-A", "sessions.worker", "report"],
        timeout=STALL,
        cwd=app_dir,
    )
    assert report.returncode == 0, report.stderr
    assert "sessions.worker.consumer:Consumer" in report.stdout, report.stdout
