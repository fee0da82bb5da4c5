"""The worker's memory: RSS, PSS and USS of each of its processes, idle and under load.

``python -m bench.worker_memory`` starts the README's worker command (``celery -A workers
worker``, and ``sessions worker``, which execs the same) in several set-ups, one after the
other in each repeat, against a temporary PostgreSQL database (``--sqlite``: a temporary
SQLite file) and a Redis database of its own; feeds each the same batches; samples every
process of the worker's tree; and prints a table (results: ``bench/results/worker-memory-*.json``).

Per process, from ``/proc/<pid>``:

* **RSS**: resident pages. ``VmHWM`` is its peak as the kernel counted it. Summed over the
  processes it counts a page a pool child shares copy-on-write with the main process once in
  each of them, the issue's "worker peak RSS".
* **PSS** (``smaps_rollup``): each shared page divided by the number of processes sharing
  it. Summed, every page once: what the worker takes from the machine.
* **USS** (``Private_Clean + Private_Dirty``): the pages only this process maps; what would
  be freed if it exited.

Peaks of PSS and USS are the largest sampled (every ``--interval`` seconds), RSS's is
``VmHWM``. ``--source DIR`` runs the default set-up from another checkout too (an export of
the commit before a change: ``git archive <commit> | tar -x -C DIR``), in the same repeats.
Every run ends with one untimed run of the default set-up with a probe that writes which
modules the main process held when it forked and which each process imported after
(``--modules``: only that). ``--imports`` measures instead what each layer of the worker's
imports adds to a fresh interpreter's RSS, in the order the worker imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest import REPO_ROOT, _cpu_seconds, _process_tree, wire_batches

#: Seconds a worker may take to say it is ready.
READY_TIMEOUT = 90.0
#: Seconds without progress after which a run is declared stuck.
STALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Setup:
    """One way of starting the worker: a label, the command after ``python -m``, extra
    environment, and the checkout it runs from."""

    label: str
    command: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    source: Path = REPO_ROOT


CELERY = ("celery", "-A", "workers", "worker")
SESSIONS = ("sessions.cli", "worker")  # the `sessions` console script
#: The README's command with Celery's CLI importing no ``click_repl`` (and so no
#: ``prompt_toolkit``), which only ``celery amqp``'s shell uses: what that import costs.
WITHOUT_REPL = ("bench.worker_memory", "--celery-without-repl", "-A", "workers", "worker")


def setups(source: Path | None, only: list[str] | None) -> list[Setup]:
    """The set-ups compared: the README's commands, the prefetch, the other pools, glibc's
    arenas and its mmap threshold."""
    chosen = [
        Setup("celery -A workers worker (prefork -c 2)", CELERY),
        Setup("sessions worker (prefork -c 2)", SESSIONS),
        Setup("prefork -c 2, MALLOC_ARENA_MAX=2", CELERY, (("MALLOC_ARENA_MAX", "2"),)),
        Setup("prefork -c 2, Celery's CLI without click_repl (bench only)", WITHOUT_REPL),
        Setup(
            "prefork -c 2, prefetch multiplier 4 (the default before 2026-12-07)",
            CELERY,
            (("SESSIONS_WORKER_PREFETCH_MULTIPLIER", "4"),),
        ),
        Setup(
            "prefork -c 2, prefetch multiplier 2",
            CELERY,
            (("SESSIONS_WORKER_PREFETCH_MULTIPLIER", "2"),),
        ),
        Setup(
            "prefork -c 2, MALLOC_MMAP_THRESHOLD_=131072",
            CELERY,
            (("MALLOC_MMAP_THRESHOLD_", "131072"),),
        ),
        Setup(
            "prefork -c 2, MALLOC_MMAP_THRESHOLD_=524288",
            CELERY,
            (("MALLOC_MMAP_THRESHOLD_", "524288"),),
        ),
        Setup("prefork -c 1", (*CELERY, "--concurrency=1")),
        Setup("threads -c 2", (*CELERY, "--pool=threads", "--concurrency=2")),
        Setup("solo", (*CELERY, "--pool=solo")),
    ]
    if source is not None:
        chosen.insert(0, Setup(f"before ({source.name}): prefork -c 2", CELERY, source=source))
    if only:
        chosen = [s for s in chosen if any(word in s.label for word in only)]
    return chosen


# -- /proc ----------------------------------------------------------------------------------


def memory_kb(pid: int) -> dict[str, int]:
    """RSS, PSS, USS and VmHWM of ``pid`` now, in KiB (empty if it is gone)."""
    figures: dict[str, int] = {}
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                figures[name] = int(rest.split()[0])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                figures["VmHWM"] = int(line.split()[1])
    if not figures:
        return {}
    return {
        "rss": figures.get("Rss", 0),
        "pss": figures.get("Pss", 0),
        "uss": figures.get("Private_Clean", 0) + figures.get("Private_Dirty", 0),
        "hwm": figures.get("VmHWM", 0),
    }


@dataclass
class Sampler:
    """Samples the memory of a process tree every ``interval`` seconds in a thread of its own,
    keeping each process's peaks and the peak of the tree's sums."""

    root: int
    interval: float
    peaks: dict[int, dict[str, int]] = field(default_factory=dict)
    peak_sums: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> dict[int, dict[str, int]]:
        now = {pid: memory_kb(pid) for pid in _process_tree(self.root)}
        now = {pid: m for pid, m in now.items() if m}
        for pid, m in now.items():
            peak = self.peaks.setdefault(pid, dict.fromkeys(m, 0))
            for k, v in m.items():
                peak[k] = max(peak[k], v)
        for k in ("rss", "pss", "uss"):
            self.peak_sums[k] = max(self.peak_sums.get(k, 0), sum(m[k] for m in now.values()))
        return now

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            with suppress(OSError):
                self.sample()

    @contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()


# -- the modules probe ----------------------------------------------------------------------

PROBE = """\
import os, sys

_dir = os.environ["WORKER_MEMORY_PROBE_DIR"]
_forked = []


def _write(kind, names):
    with open(os.path.join(_dir, f"{kind}-{os.getpid()}.txt"), "a") as f:
        f.write("".join(n + "\\n" for n in names))


def _after_fork_in_child():
    _forked.append(True)
    _write("forked-with", sorted(sys.modules))


def _audit(event, args):
    if event == "import" and _forked:
        _write("imported", [args[0]])


os.register_at_fork(
    after_in_child=_after_fork_in_child, after_in_parent=lambda: _forked.append(True)
)
sys.addaudithook(_audit)
"""


def probe_environment(directory: Path) -> dict[str, str]:
    (directory / "sitecustomize.py").write_text(PROBE)
    return {"WORKER_MEMORY_PROBE_DIR": str(directory)}


def read_probe(directory: Path, main: int) -> dict[str, Any]:
    """What the main process held at its first fork, and what each process imported after it."""
    forked = sorted(directory.glob("forked-with-*.txt"))
    at_fork = set(forked[0].read_text().split()) if forked else set()
    imported: dict[str, list[str]] = {}
    for path in directory.glob("imported-*.txt"):
        pid = int(path.stem.rsplit("-", 1)[1])
        role = "main" if pid == main else f"child {pid}"
        imported[role] = sorted(set(path.read_text().split()) - at_fork)
    tops = sorted({name.split(".")[0] for name in at_fork})
    return {
        "main_at_fork_modules": len(at_fork),
        "main_at_fork_packages": tops,
        "imported_after_the_fork_by": imported,
    }


# -- what the imports cost -------------------------------------------------------------------

#: The worker's imports, layer by layer, in the order ``celery -A workers worker`` makes them.
IMPORT_LAYERS = (
    ("Celery", "celery"),
    ("Celery's CLI without celery amqp's shell", "celery.bin.worker"),
    ("click_repl, prompt_toolkit (celery amqp's shell)", "click_repl"),
    ("the rest of Celery's CLI", "celery.bin.celery"),
    ("kombu's Redis transport, redis-py", "kombu.transport.redis"),
    ("pydantic, pydantic-settings, the settings", "sessions.settings"),
    ("SQLAlchemy", "sqlalchemy"),
    ("psycopg", "psycopg"),
    ("Alembic (the start-up migration)", "alembic.command"),
    ("the store, its tables and histograms", "sessions.store"),
    ("the worker's app and tasks", "sessions.worker.tasks"),
)

LADDER = """
import importlib, json, sys

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

steps = [("Python", rss_kb(), len(sys.modules))]
for label, module in json.loads(sys.argv[1]):
    importlib.import_module(module)
    steps.append((label, rss_kb(), len(sys.modules)))
print(json.dumps(steps))
"""


def import_ladder(database_url: str) -> list[dict[str, Any]]:
    """VmRSS of a fresh interpreter after each of :data:`IMPORT_LAYERS`, and what each adds."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONS_")}
    environment["SESSIONS_DATABASE_URL"] = database_url
    out = subprocess.run(
        [sys.executable, "-c", LADDER, json.dumps(IMPORT_LAYERS)],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows, before = [], 0
    for label, kb, modules in json.loads(out):
        rows.append(
            {
                "layer": label,
                "rss_mb": kb / 1024,
                "adds_mb": (kb - before) / 1024,
                "modules": modules,
            }
        )
        before = kb
    return rows


# -- one run --------------------------------------------------------------------------------


def start(setup: Setup, environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            *setup.command,
            "--loglevel=INFO",
            f"--hostname=memory-{uuid.uuid4().hex[:8]}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ],
        cwd=setup.source,
        env=environment,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    deadline = time.monotonic() + READY_TIMEOUT
    while b" ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"{setup.label}: worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def requests_in(engine: Any) -> int:
    from sqlalchemy import text

    with engine.connect() as c:
        return int(
            c.execute(text("SELECT coalesce(sum(request_count), 0) FROM sessions")).scalar_one()
        )


def empty(engine: Any) -> None:
    """Delete every row of the store's tables (its metadata's, children first), so that each
    set-up starts from the same empty schema whatever revision added or dropped a table."""
    from sqlalchemy import delete

    from sessions.tables import Base

    with engine.begin() as c:
        for table in reversed(Base.metadata.sorted_tables):
            c.execute(delete(table))


def by_role(root: int, figures: dict[int, dict[str, int]]) -> list[dict[str, Any]]:
    """``figures`` per process, the main one first, in MiB."""
    rows = []
    for pid in sorted(figures, key=lambda p: (p != root, p)):
        role = "main" if pid == root else "pool child"
        rows.append(
            {"role": role, "pid": pid, **{k: round(v / 1024, 1) for k, v in figures[pid].items()}}
        )
    return rows


def run_once(
    setup: Setup,
    texts: list[str],
    events: int,
    broker_url: str,
    database_url: str,
    workdir: Path,
    interval: float,
    probe: Path | None = None,
) -> dict[str, Any]:
    from sqlalchemy import create_engine

    from sessions.publisher import CeleryPublisher
    from sessions.settings import Settings

    environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONS_")}
    environment.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([*([str(probe)] if probe else []), str(setup.source)]),
        SESSIONS_BROKER_URL=broker_url,
        SESSIONS_DATABASE_URL=database_url,
        SESSIONS_SPOOL_DIR=str(workdir / "spool"),
        SESSIONS_BROKER_CONFIRMATIONS="false",
        SESSIONS_CONFIRMER="ledger",
        **dict(setup.environment),
    )
    if probe:
        environment.update(probe_environment(probe))
    engine = create_engine(database_url)
    empty(engine)
    publisher = CeleryPublisher(Settings(broker_url=broker_url))
    log = workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
    process = start(setup, environment, log)
    try:
        time.sleep(1.0)  # the pool's processes finish starting
        sampler = Sampler(process.pid, interval)
        idle = sampler.sample()
        cpu_before = sum(_cpu_seconds(pid) for pid in _process_tree(process.pid))
        started = time.perf_counter()
        with sampler.running():
            for message in texts:
                publisher.publish_text(message)
            seen, last, last_change = 0, -1, time.monotonic()
            while seen < events:
                seen = requests_in(engine)
                if seen != last:
                    last, last_change = seen, time.monotonic()
                elif time.monotonic() - last_change > STALL_TIMEOUT or process.poll() is not None:
                    raise RuntimeError(
                        f"{setup.label}: stuck at {seen} of {events} requests:\n"
                        f"{log.read_text(errors='replace')[-3000:]}"
                    )
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            cpu = sum(_cpu_seconds(pid) for pid in _process_tree(process.pid)) - cpu_before
        after = sampler.sample()
        probed = read_probe(probe, process.pid) if probe else None
    finally:
        stop(process)
        publisher.close()
        engine.dispose()
    peak = sampler.peaks
    return {
        "label": setup.label,
        "command": " ".join(setup.command),
        "environment": dict(setup.environment),
        "source": str(setup.source),
        "events_per_second": events / elapsed,
        "cpu_us_per_event": cpu / events * 1e6,
        "processes": len(peak),
        "idle": by_role(process.pid, idle),
        "after_load": by_role(process.pid, after),
        "peak": by_role(process.pid, peak),
        "sum_mb": {
            "idle_rss": sum(m["rss"] for m in idle.values()) / 1024,
            "idle_pss": sum(m["pss"] for m in idle.values()) / 1024,
            "peak_rss_vmhwm": sum(m["hwm"] for m in peak.values()) / 1024,
            "peak_pss": sampler.peak_sums["pss"] / 1024,
            "peak_uss": sampler.peak_sums["uss"] / 1024,
        },
        **({"modules": probed} if probed else {}),
    }


# -- report ---------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the repeats of each set-up, in the set-ups' order."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    rows = []
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        med = {k: statistics.median(r["sum_mb"][k] for r in mine) for k in mine[0]["sum_mb"]}
        per = {
            role: statistics.median(p["hwm"] for r in mine for p in r["peak"] if p["role"] == role)
            for role in ("main", "pool child")
            if any(p["role"] == role for r in mine for p in r["peak"])
        }
        rows.append(
            {
                "label": label,
                "processes": mine[0]["processes"],
                "events_per_second": statistics.median(r["events_per_second"] for r in mine),
                "cpu_us_per_event": statistics.median(r["cpu_us_per_event"] for r in mine),
                "peak_vmhwm_by_role_mb": per,
                **{f"{k}_mb": v for k, v in med.items()},
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| worker | processes | events/s | CPU us/event"
        " | peak RSS (VmHWM) summed, MB: main + each child"
        " | peak PSS summed, MB | peak USS summed, MB | idle RSS / PSS summed, MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per = r["peak_vmhwm_by_role_mb"]
        parts = f"{per['main']:.0f}" + (
            f" + {per['pool child']:.0f} x {r['processes'] - 1}" if "pool child" in per else ""
        )
        lines.append(
            f"| {r['label']} | {r['processes']} | {r['events_per_second']:,.0f} "
            f"| {r['cpu_us_per_event']:.1f} | **{r['peak_rss_vmhwm_mb']:.0f}** ({parts}) "
            f"| {r['peak_pss_mb']:.0f} | {r['peak_uss_mb']:.0f} "
            f"| {r['idle_rss_mb']:.0f} / {r['idle_pss_mb']:.0f} |"
        )
    return "\n".join(lines)


@contextmanager
def database(sqlite: bool, workdir: Path) -> Iterator[str]:
    if sqlite:
        yield f"sqlite:///{workdir / 'sessions.db'}"
        return
    from tests.support.services import temporary_postgres_database

    with temporary_postgres_database("sessions_bench_memory") as url:
        yield url


def celery_without_repl(argv: list[str]) -> None:
    """``celery <argv>`` with a stand-in ``click_repl`` (:data:`WITHOUT_REPL`)."""
    import types

    stand_in = types.ModuleType("click_repl")
    stand_in.register_repl = lambda *_, **__: None  # type: ignore[attr-defined]
    sys.modules["click_repl"] = stand_in
    from celery.bin.celery import main as celery

    sys.argv = ["celery", *argv]
    celery()


def save(kind: str, results: dict[str, Any], argv: list[str] | None) -> None:
    """Write ``results`` to ``bench/results/<kind>-<UTC time>.json`` with the command."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = REPO_ROOT / "bench" / "results" / f"{kind}-{stamp}.json"
    command = " ".join(["python", "-m", "bench.worker_memory", *(argv or sys.argv[1:])])
    path.write_text(
        json.dumps({"command": command, "load_average": os.getloadavg(), **results}, indent=1)
    )
    print(f"saved {path.relative_to(REPO_ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-events", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file, not PostgreSQL")
    parser.add_argument("--source", type=Path, help="a checkout to compare (runs its prefork -c 2)")
    parser.add_argument("--only", nargs="*", help="set-ups whose label holds one of these words")
    parser.add_argument("--modules", action="store_true", help="probe modules, no table")
    parser.add_argument("--imports", action="store_true", help="what each import layer costs")
    parser.add_argument("--no-save", action="store_true")
    arguments = parser.parse_args(argv)

    from sessions.database import upgrade_schema
    from tests.support.workers_harness import claimed_redis_db

    if arguments.imports:
        ladders = [import_ladder("sqlite:///:memory:") for _ in range(3)]
        for layer in zip(*ladders, strict=True):
            rss = statistics.median(step["rss_mb"] for step in layer)
            adds = statistics.median(step["adds_mb"] for step in layer)
            print(
                f"{layer[0]['layer']:50s} {rss:6.1f} MB (+{adds:4.1f}), "
                f"{layer[0]['modules']} modules"
            )
        if not arguments.no_save:
            save("worker-imports", {"layers": IMPORT_LAYERS, "ladders": ladders}, argv)
        return

    texts = wire_batches(arguments.sessions, arguments.batches, arguments.batch_events)
    events = arguments.batches * arguments.batch_events
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="worker-memory-")))
        broker_url = stack.enter_context(claimed_redis_db())
        database_url = stack.enter_context(database(arguments.sqlite, workdir))
        upgrade_schema(database_url)  # before any worker: none of them pays for it
        chosen = setups(arguments.source and arguments.source.resolve(), arguments.only)
        default = next(s for s in chosen if s.source == REPO_ROOT)

        def probed() -> dict[str, Any]:
            """One untimed run with the probe: what the main process holds when it forks."""
            probe = workdir / f"probe-{uuid.uuid4().hex[:6]}"
            probe.mkdir()
            run = run_once(
                default, texts, events, broker_url, database_url, workdir, arguments.interval, probe
            )
            return dict(run["modules"])

        if arguments.modules:
            print(json.dumps(probed(), indent=1))
            return
        runs: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for round_ in range(arguments.repeat):
            for setup in chosen:
                try:
                    run = run_once(
                        setup, texts, events, broker_url, database_url, workdir, arguments.interval
                    )
                except RuntimeError as exc:  # a busy machine; the failure is kept, not hidden
                    print(exc, file=sys.stderr)
                    failures.append({"label": setup.label, "repeat": round_, "error": str(exc)})
                    continue
                run["repeat"] = round_
                runs.append(run)
                print(
                    f"{setup.label}: {run['sum_mb']['peak_rss_vmhwm']:.0f} MB RSS, "
                    f"{run['sum_mb']['peak_pss']:.0f} MB PSS, "
                    f"{run['events_per_second']:,.0f} events/s",
                    file=sys.stderr,
                )
        modules = probed()
    rows = summarize(runs)
    print(table(rows))
    if not arguments.no_save:
        save(
            "worker-memory",
            {
                "database": "sqlite" if arguments.sqlite else "postgresql",
                "batches": arguments.batches,
                "batch_events": arguments.batch_events,
                "summary": rows,
                "runs": runs,
                "failures": failures,
                "modules": modules,
            },
            argv,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--celery-without-repl"]:
        celery_without_repl(sys.argv[2:])
    else:
        main()
