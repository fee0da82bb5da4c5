"""How long an agent takes from its start to its first message in the broker (not a test).

Each run is a fresh ``python`` process, and five kinds take turns, round after round:

* **bare**: ``import celery``, ``celery.Celery(broker=...)``, one ``send_task`` of a one-event
  batch to the ingest queue: the floor of any Celery client (the ratios are against it);
* **bare + pydantic-settings**: the same, after reading its broker URL with a pydantic-settings
  model as the tracker does: the floor of any Celery + pydantic client;
* **tracker**: ``from sessions import SessionTracker``, a tracker with the shipped settings
  (confirmation on, the spool), one ``record`` and a ``flush``;
* **tracker, no confirm**: the same with ``SESSIONS_CONFIRM_TIMEOUT_SECONDS=0``: its close does
  not look at the ledger (the look imports the store: item 3 of issue 13 removes it);
* **tracker, create + record**: the tracker, as an agent written after the guide starts: a
  ``create`` (owner and metadata) before the ``record``.

The parent measures each run from the moment it spawns the process: until the message is in
Redis (a ``BLPOP`` on the queue's list, which returns the moment the message is pushed: no
polling), and until the process has exited. The child reports what it loaded when the message
went out: modules in ``sys.modules``, and which of the names an agent must never load
(SQLAlchemy, Alembic, Starlette, the worker, ``celeryconfig``). A ``python -X importtime`` of
each kind adds where the import time goes, by top-level package. Nobody consumes the queue:
the bench pops what it measures, on a Redis database it claims (empty, marked, flushed after).

Every kind runs, by default, in a virtualenv of its own made for the run, with a wheel of the
checkout installed as an agent installs it (``pip install agent-sessions``, no extra; about a
minute to make), and Celery beside it for the bare kinds (an agent's install has none): the
project's modules are imported from the ``.pyc`` files pip compiles, as the libraries' are,
no checkout is on the path, and no editable install's finder runs at each interpreter start
(the project's own virtualenv pays about 27 ms for it, bare client included). ``--checkout``
runs the bench's own interpreter with the checkout on ``PYTHONPATH`` instead, byte-compiled
first (``compileall``): quicker, for comparing commits. A result's ``installed`` field says
which way it was made; the results without one (before 2026-12-02T19:17Z) were made the
``--checkout`` way without the compiling: on a machine with ``PYTHONDONTWRITEBYTECODE`` set
(this one) they charged the tracker for compiling its source at every start.

::

    python -m bench.client_start                 # 15 rounds on a claimed database of local Redis
    python -m bench.client_start --rounds 30 --redis redis://127.0.0.1:6379
    mkdir -p /tmp/before && git archive 9223d33 | tar -x -C /tmp/before
    python -m bench.client_start --source /tmp/before    # the commit before issue 13
    python -m bench.client_start --checkout      # this checkout, on the bench's interpreter

Prints a markdown table and writes ``bench/results/client-start-<time>.json``.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The list kombu's Redis transport keeps the ingest queue's messages in.
QUEUE = "sessions.events"
#: Modules (and their submodules) an agent that records must never load: the store's, the
#: worker's (a checkout's shims for it too, and how it decodes batches) and the dashboard's,
#: and Celery (the client publishes Celery's messages through kombu).
#: tests/unit/test_client_imports.py checks the same list.
FORBIDDEN = (
    "celery",
    "sqlalchemy",
    "alembic",
    "starlette",
    "prometheus_client",
    "sessions.worker",
    "sessions.decoding",
    "workers",
    "celeryconfig",
)
#: Seconds a run may take before the bench gives up on it.
RUN_TIMEOUT = 120
#: The brief's target: the tracker's first message within this factor of the bare floor.
TARGET_RATIO = 1.3

#: What each child prints once its message is out (the parent adds its own clock).
_REPORT = f"""
import json, sys
def _report(**figures):
    forbidden = {{f for f in {list(FORBIDDEN)!r} for name in sys.modules
                 if name == f or name.startswith(f + ".")}}
    # CPU of all its threads until the message was out: what a busy machine's waits leave alone.
    figures.update(
        cpu_s=time.process_time(), modules=len(sys.modules), forbidden=sorted(forbidden),
        sessions_file=getattr(sys.modules.get("sessions"), "__file__", None),
        # The spool imports sqlite3 only when it opens its file: a spool of earlier runs.
        spool_opened="sqlite3" in sys.modules,
    )
    print(json.dumps(figures), flush=True)
"""


def _bare(prelude: str) -> str:
    """A bare Celery client: ``prelude`` (imports), then one ``send_task``."""
    return (
        "import time\n"
        "started = time.perf_counter()\n"
        "import os\n"
        f"{prelude}"
        "import celery\n"
        "imported = time.perf_counter()\n"
        'app = celery.Celery(broker=os.environ["SESSIONS_BROKER_URL"], set_as_current=False)\n'
        "made = time.perf_counter()\n"
        'app.send_task("sessions.ingest", args=[os.environ["BENCH_TEXT"]], '
        'queue="sessions.events")\n'
        "sent = time.perf_counter()\n"
        + _REPORT
        + "_report(import_s=imported - started, construct_s=made - imported, "
        "publish_s=sent - made)\n"
        "app.close()\n"
    )


BARE = _bare("")
#: The bare client with settings read by pydantic-settings, as the tracker's are: the floor
#: of any Celery + pydantic client.
BARE_PYDANTIC = _bare(
    "import pydantic_settings\n"
    "class ClientSettings(pydantic_settings.BaseSettings):\n"
    '    model_config = pydantic_settings.SettingsConfigDict(env_prefix="SESSIONS_")\n'
    "    broker_url: str\n"
    "ClientSettings()\n"
)

TRACKER = (
    "import time\n"
    "started = time.perf_counter()\n"
    "from sessions import SessionTracker\n"
    "imported = time.perf_counter()\n"
    "tracker = SessionTracker()\n"
    "made = time.perf_counter()\n"
    'tracker.record("bench-session", processing_time=0.25)\n'
    "tracker.flush()\n"
    "while not tracker.stats.batches_sent:  # the publisher thread's publish returned\n"
    "    time.sleep(0.001)\n"
    "sent = time.perf_counter()\n"
    + _REPORT
    + "_report(import_s=imported - started, construct_s=made - imported, "
    "publish_s=sent - made)\n"
    "tracker.close()\n"
)

#: An agent as the guide's are written: it creates its session (owner, metadata) first.
TRACKER_CREATING = TRACKER.replace(
    'tracker.record("bench-session"',
    'tracker.create("bench-session", user_id="bench-user", metadata={"model": "m"})\n'
    'tracker.record("bench-session"',
)
assert TRACKER_CREATING != TRACKER

#: kind -> (child code, extra environment)
KINDS: dict[str, tuple[str, dict[str, str]]] = {
    "bare": (BARE, {}),
    "bare + pydantic-settings": (BARE_PYDANTIC, {}),
    "tracker": (TRACKER, {}),
    "tracker, no confirm": (TRACKER, {"SESSIONS_CONFIRM_TIMEOUT_SECONDS": "0"}),
    "tracker, create + record": (TRACKER_CREATING, {}),
}


@dataclass
class Run:
    """One process: the parent's clock (from spawn) and the child's own figures."""

    kind: str
    first_message_s: float
    exit_s: float
    import_s: float
    construct_s: float
    publish_s: float
    cpu_s: float
    modules: int
    forbidden: list[str] = field(default_factory=list)
    #: Where the child's ``sessions`` came from (``None``: not imported, the bare kinds).
    sessions_file: str | None = None
    #: Whether it opened a spool file (a tracker that found earlier runs' batches).
    spool_opened: bool = False


#: The checkout whose ``sessions`` the children import (``--source``).
source = REPO_ROOT
#: The interpreter the children run, and whether they find ``sessions`` on ``PYTHONPATH``
#: (``--checkout``) instead of installed in its virtualenv.
interpreter = Path(sys.executable)
on_pythonpath = True


def _worker_celery() -> str:
    """The worker extra's requirement of Celery (pyproject.toml): what the bare kinds install."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    worker: list[str] = project["optional-dependencies"]["worker"]
    return next(requirement for requirement in worker if requirement.startswith("celery"))


#: The Celery the bare kinds import.
BARE_CELERY = _worker_celery()
#: Seconds a build or an install may take (pip resolving on a busy machine is slow).
INSTALL_TIMEOUT = 900


def installed_agent(where: Path) -> Path:
    """A virtualenv at ``where`` with a wheel of :data:`source` installed as an agent installs
    it (no extra), and Celery for the bare kinds; its interpreter. Raises
    ``subprocess.CalledProcessError`` if pip fails, ``ValueError`` if the build left no single
    wheel."""
    checkout = shutil.copytree(
        source,
        where / "checkout",
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache", "sessions.db*"
        ),
    )
    wheels = where / "wheels"
    _install_step(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), "."], checkout
    )
    (wheel,) = wheels.glob("agent_sessions-*.whl")
    _install_step([sys.executable, "-m", "venv", str(where / "venv")], where)
    python = where / "venv" / "bin" / "python"
    # Celery for the bare kinds only: an agent's install no longer brings it (the worker
    # extra does), and the tracker never imports it (each run reports what it loaded).
    _install_step([str(python), "-m", "pip", "install", "-q", str(wheel), BARE_CELERY], where)
    return python


def _install_step(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, timeout=INSTALL_TIMEOUT)


def _environment(broker_url: str, folder: Path, extra: dict[str, str]) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONS_")}
    batch = {
        "batch_id": str(uuid.uuid4()),
        "events": [{"kind": "record", "session_id": "bench-session", "processing_time": 0.25}],
    }
    if on_pythonpath:
        environment["PYTHONPATH"] = str(source)
    else:
        environment.pop("PYTHONPATH", None)
    return environment | {
        "SESSIONS_BROKER_URL": broker_url,
        "SESSIONS_SPOOL_DIR": str(folder / "spool"),
        # No database file: like an agent on a host the workers' database is not on.
        "SESSIONS_DATABASE_URL": f"sqlite:///{folder / 'sessions.db'}",
        "BENCH_TEXT": json.dumps(batch),
        **extra,
    }


def run_once(kind: str, broker_url: str, client: Any, folder: Path) -> Run:
    """Spawn one ``kind`` process; time it to its message in Redis and to its exit.

    Each run has a spool folder of its own, new and empty, as an agent's first start has: a
    tracker closes with its batch unconfirmed (nobody consumes the queue) and spools it, and
    a shared folder would have every later run open that spool and replay what the earlier
    ones left before its own first message (until 2026-12-03 it did: those runs loaded
    ``sqlite3`` and replayed up to one batch per earlier tracker run).
    """
    code, extra = KINDS[kind]
    client.delete(QUEUE)
    own = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    environment = _environment(broker_url, own, extra)
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(interpreter), "-c", code],
        cwd=folder,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        popped = client.blpop([QUEUE], timeout=RUN_TIMEOUT)
        arrived = time.perf_counter()
        out, err = process.communicate(timeout=RUN_TIMEOUT)
        exited = time.perf_counter()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(own, ignore_errors=True)
    if popped is None or process.returncode != 0:
        raise RuntimeError(f"{kind}: no message, or exit status {process.returncode}: {err}")
    figures = json.loads(out.strip().splitlines()[-1])
    run = Run(kind, arrived - started, exited - started, **figures)
    expected = source if on_pythonpath else interpreter.parent.parent
    if run.sessions_file is not None and not Path(run.sessions_file).is_relative_to(expected):
        raise RuntimeError(f"{kind}: imported {run.sessions_file}, not from {expected}")
    if run.spool_opened:
        raise RuntimeError(f"{kind}: opened a spool, so it measured a replay, not a first start")
    return run


#: The packages whose versions the children run, read with their interpreter.
PACKAGES = ("agent-sessions", "celery", "kombu", "redis", "pydantic", "pydantic-settings")


def versions() -> dict[str, str | None]:
    """The version of each of :data:`PACKAGES` the children import (``None``: not installed)."""
    code = (
        "import importlib.metadata as m, json\n"
        "def version(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        f"print(json.dumps({{name: version(name) for name in {PACKAGES!r}}}))\n"
    )
    done = subprocess.run(
        [str(interpreter), "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    found: dict[str, str | None] = json.loads(done.stdout)
    return found


def source_revision() -> dict[str, Any]:
    """The commit :data:`source` is at and whether its tree differs from it (``None`` when it
    is no git checkout, an export for example)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain"], capture_output=True, text=True
        )
    except OSError:
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def import_profile(kind: str, broker_url: str, folder: Path) -> dict[str, Any]:
    """``python -X importtime`` of one ``kind`` process: milliseconds by top-level package
    (summed self times), and the total."""
    code, extra = KINDS[kind]
    own = Path(tempfile.mkdtemp(prefix="profile-", dir=folder))  # as run_once: a spool of its own
    finished = subprocess.run(
        [str(interpreter), "-X", "importtime", "-c", code],
        cwd=folder,
        env=_environment(broker_url, own, extra),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    shutil.rmtree(own, ignore_errors=True)
    by_package: dict[str, float] = {}
    modules = 0
    for line in finished.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        package = name.split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(self_us) / 1000
        modules += 1
    top = dict(sorted(by_package.items(), key=lambda item: -item[1])[:8])
    return {
        "total_ms": round(sum(by_package.values()), 1),
        "modules": modules,
        "top_ms": {k: round(v, 1) for k, v in top.items()},
    }


@contextmanager
def claimed_database(redis_url: str) -> Iterator[tuple[str, Any]]:
    """An empty database of the Redis at ``redis_url`` (1-15, the first free one), marked
    with ``SET NX`` so that concurrent runs and tests never share it, flushed afterwards."""
    import redis

    marker = f"bench-client-start-{uuid.uuid4().hex}"
    for number in range(15, 0, -1):
        url = f"{redis_url.rstrip('/')}/{number}"
        client = redis.Redis.from_url(url, socket_timeout=RUN_TIMEOUT + 5)
        if client.dbsize() == 0 and client.set("sessions-test-claim", marker, nx=True, ex=3600):
            try:
                yield url, client
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError(f"no free Redis database among 1-15 at {redis_url}")


def summary(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per kind: medians, minimum and maximum of the parent's clocks, the child's figures."""
    kinds: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [run for run in runs if run.kind == kind]
        first = [run.first_message_s * 1000 for run in mine]
        kinds[kind] = {
            "runs": len(mine),
            "first_message_ms": round(statistics.median(first), 1),
            "first_message_min_ms": round(min(first), 1),
            "first_message_max_ms": round(max(first), 1),
            "exit_ms": round(statistics.median(run.exit_s * 1000 for run in mine), 1),
            "import_ms": round(statistics.median(run.import_s * 1000 for run in mine), 1),
            "construct_ms": round(statistics.median(run.construct_s * 1000 for run in mine), 1),
            "publish_ms": round(statistics.median(run.publish_s * 1000 for run in mine), 1),
            "cpu_ms": round(statistics.median(run.cpu_s * 1000 for run in mine), 1),
            "modules": max(run.modules for run in mine),
            "forbidden": sorted({name for run in mine for name in run.forbidden}),
        }
    bare, bare_best = kinds["bare"]["first_message_ms"], kinds["bare"]["first_message_min_ms"]
    for figures in kinds.values():
        figures["ratio"] = round(figures["first_message_ms"] / bare, 2)
        # The fastest runs are the least disturbed by whatever else the machine runs.
        figures["ratio_best"] = round(figures["first_message_min_ms"] / bare_best, 2)
        # CPU spent until the message was out: steadier than the clocks on a loaded machine.
        figures["ratio_cpu"] = round(figures["cpu_ms"] / kinds["bare"]["cpu_ms"], 2)
    return kinds


def table(kinds: dict[str, dict[str, Any]], profiles: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| process | first message in Redis, ms (median, min-max) | vs bare (median; fastest) "
        "| CPU to first message, ms (vs bare) | exit, ms | import / construct / publish, ms "
        "| modules | forbidden loaded | importtime total, ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for kind, f in kinds.items():
        lines.append(
            f"| {kind} | {f['first_message_ms']:.0f} ({f['first_message_min_ms']:.0f}-"
            f"{f['first_message_max_ms']:.0f}) | {f['ratio']:.2f}x; {f['ratio_best']:.2f}x | "
            f"{f['cpu_ms']:.0f} ({f['ratio_cpu']:.2f}x) | {f['exit_ms']:.0f} | "
            f"{f['import_ms']:.0f} / {f['construct_ms']:.0f} / {f['publish_ms']:.0f} | "
            f"{f['modules']} | {', '.join(f['forbidden']) or 'none'} | "
            f"{profiles[kind]['total_ms']:.0f} |"
        )
    tracker = kinds["tracker"]
    met = max(tracker["ratio"], tracker["ratio_best"]) <= TARGET_RATIO
    lines.append("")
    lines.append(
        f"Target: the tracker's first message within {TARGET_RATIO}x of the bare floor: "
        f"{'met' if met else 'not met'} ({tracker['ratio']:.2f}x median, "
        f"{tracker['ratio_best']:.2f}x fastest; CPU to the first message "
        f"{tracker['ratio_cpu']:.2f}x)."
    )
    for kind, profile in profiles.items():
        top = ", ".join(f"{name} {ms:.0f}" for name, ms in profile["top_ms"].items())
        lines.append(f"* importtime, {kind}: {profile['modules']} modules; ms by package: {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15, help="runs of each kind (default 15)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server URL")
    parser.add_argument(
        "--source",
        type=Path,
        default=REPO_ROOT,
        help="the checkout whose sessions package the agents import (default: this one), "
        "e.g. an export of an earlier commit to compare with",
    )
    parser.add_argument(
        "--checkout",
        action="store_true",
        help="run the bench's interpreter with the checkout on PYTHONPATH (byte-compiled) "
        "instead of a virtualenv with its wheel installed",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    arguments = parser.parse_args(argv)
    global source, interpreter, on_pythonpath
    source = arguments.source.resolve()
    if arguments.rounds < 1:
        parser.error("--rounds: must be at least 1")
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="client-start-") as folder,
        claimed_database(arguments.redis) as (broker_url, client),
    ):
        if arguments.checkout:
            # As an installed package is: compiled once, not at each start (see the module).
            if not compileall.compile_dir(source / "sessions", quiet=1):
                raise RuntimeError(f"could not byte-compile {source / 'sessions'}")
        else:
            interpreter, on_pythonpath = installed_agent(Path(folder) / "agent"), False
        order = list(KINDS)
        for index in range(arguments.rounds):
            # Each round starts with another kind: no kind always runs right after another.
            rotated = order[index % len(order) :] + order[: index % len(order)]
            runs.extend(run_once(kind, broker_url, client, Path(folder)) for kind in rotated)
        profiles = {kind: import_profile(kind, broker_url, Path(folder)) for kind in KINDS}
        redis_version = client.info("server")["redis_version"]
        packages = versions()  # while the children's virtualenv is still there
    kinds = summary(runs)
    print(table(kinds, profiles))
    if not arguments.no_save:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"client-start-{stamp}.json"
        result = {
            "command": "python -m bench.client_start " + " ".join(argv or sys.argv[1:]),
            "source": str(source),
            "revision": source_revision(),
            "installed": "checkout on PYTHONPATH, byte-compiled"
            if arguments.checkout
            else "wheel in a virtualenv of its own",
            "machine": {
                "cpus": str(os.cpu_count()),
                "python": platform.python_version(),
                "packages": packages,
                "redis": str(redis_version),
                "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            },
            "summary": kinds,
            "importtime": profiles,
            "runs": [asdict(run) for run in runs],
        }
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
