"""``sessions demo``: the whole pipeline on one machine, driven by a simulated agent fleet.

It starts a real Celery worker and beat as subprocesses, records requests from a fleet of
simulated sessions through :class:`SessionTracker`, lets beat's sweeps act on shortened
intervals, and prints what the database ends up holding. With no ``SESSIONS_DATABASE_URL``
and ``SESSIONS_BROKER_URL`` set it runs on the embedded default (a SQLite file and the
filesystem broker, in a fresh folder under ``.demo/``), so it needs no server at all.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sessions.errors import FlushTimeoutError
from sessions.settings import Settings, get_settings, mask_url
from sessions.store import SessionStore
from sessions.tracker import SessionTracker

console = Console()

#: Seconds without activity after which the demo's idle sweep expires a session (counted
#: from when the worker caught up with the agents).
IDLE_SECONDS = 4
#: Shortened housekeeping so the sweeps act within the demo's few seconds.
DEMO_ENVIRONMENT = {
    "SESSIONS_MAX_IDLE_SECONDS": str(IDLE_SECONDS),
    "SESSIONS_MAX_AGE_DAYS": str(30 / 86400),  # 30 seconds
    "SESSIONS_HEALTH_MIN_REQUESTS": "10",
    "SESSIONS_IDLE_SWEEP_INTERVAL": "1",
    "SESSIONS_AGE_SWEEP_INTERVAL": "1",
    "SESSIONS_HEALTH_SWEEP_INTERVAL": "1",
    "SESSIONS_PURGE_INTERVAL": "30",
}
#: Longest the demo waits for the sweeps to end one more session before it reports a failure.
SETTLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class DemoConfig:
    users: int = 20
    sessions: int = 60
    requests_per_session: int = 40
    #: Seconds between two rounds of requests across the fleet.
    round_interval: float = 0.15
    seed: int = 7


@dataclass(frozen=True)
class SimulatedSession:
    session_id: str
    user_id: str
    #: ``healthy``, ``failing`` (high error rate), ``idle`` (goes quiet) or ``old`` (past max age).
    kind: str
    error_rate: float


def plan_fleet(config: DemoConfig, run_id: str) -> list[SimulatedSession]:
    """Sessions spread over users; about 1 in 7 failing, 1 in 6 going idle, 1 in 10 old."""
    rng = random.Random(config.seed)
    fleet = []
    for index in range(config.sessions):
        user = f"user-{run_id}-{index % config.users:02d}"
        if index % 7 == 3:
            kind, rate = "failing", 0.7
        elif index % 6 == 1:
            kind, rate = "idle", 0.05
        elif index % 10 == 5:
            kind, rate = "old", 0.05
        else:
            kind, rate = "healthy", rng.uniform(0.0, 0.1)
        fleet.append(SimulatedSession(f"{user}-device-{index:03d}", user, kind, rate))
    return fleet


class Services:
    """A worker and a beat subprocess, stopped cleanly (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, workdir: Path, environment: dict[str, str]):
        self.workdir = workdir
        self.environment = environment
        self.processes: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, arguments: list[str], **environment: str) -> None:
        """Start ``celery <arguments>``, with ``environment`` over the demo's own."""
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "sessions.worker", *arguments],
            env={**self.environment, **environment},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append((name, process, log))

    def check_alive(self) -> None:
        for name, process, _ in self.processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the {name} exited with code {process.returncode}; "
                    f"see {self.workdir / (name + '.log')}"
                )

    def stop(self) -> None:
        for _, process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, log in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_until(progress: Callable[[], int], goal: int, timeout: float, services: Services) -> bool:
    """Wait until ``progress()`` reaches ``goal``; give up once it has not moved for
    ``timeout`` seconds (a busy machine slows the worker and beat down, it does not stop
    them)."""
    reached = progress()
    deadline = time.monotonic() + timeout
    while reached < goal and time.monotonic() < deadline:
        services.check_alive()
        time.sleep(0.2)
        if (now := progress()) != reached:
            reached, deadline = now, time.monotonic() + timeout
    return reached >= goal


def _prepare_environment(run_id: str) -> tuple[Path, dict[str, str]]:
    """The demo's own folder and environment; the embedded default unless URLs are set."""
    workdir = Path(".demo") / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ)
    environment.update(DEMO_ENVIRONMENT)
    if "SESSIONS_DATABASE_URL" not in os.environ:
        environment["SESSIONS_DATABASE_URL"] = f"sqlite:///{(workdir / 'sessions.db').resolve()}"
    if "SESSIONS_BROKER_URL" not in os.environ:
        environment["SESSIONS_BROKER_URL"] = "filesystem://"
        environment["SESSIONS_BROKER_DIR"] = str((workdir / "broker").resolve())
    # This process publishes through the same Celery configuration as the subprocesses.
    os.environ.update(environment)
    get_settings.cache_clear()
    return workdir, environment


@dataclass(frozen=True)
class FleetRun:
    """What the simulated fleet did, timed from the agents' side."""

    recorded: int
    #: Seconds from the first to the last ``record``.
    recording: float
    #: Seconds from the last ``record`` until every event was committed.
    drain: float


def run_demo(config: DemoConfig) -> int:
    started = time.monotonic()
    run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir, environment = _prepare_environment(run_id)
    settings = get_settings()
    console.rule("[bold]session metrics demo")
    console.print(f"database  {mask_url(settings.database_url)}")
    console.print(f"broker    {mask_url(settings.broker_url)}")
    console.print(f"logs      {workdir}/worker.log, {workdir}/beat.log")

    store = SessionStore(settings.database_url, settings=settings)
    store.upgrade()
    services = Services(workdir, environment)
    try:
        services.start(
            "worker",
            [
                "worker",
                "-Q",
                "sessions.events,sessions.maintenance",
                "--loglevel",
                "INFO",
                "--concurrency",
                "2",
                "--without-gossip",
                "--without-mingle",
            ],
        )
        fleet = plan_fleet(config, uuid.uuid4().hex[:4])
        run = _drive_fleet(config, fleet, settings)
        # The sweeps start once every event is applied, and a session counts as idle only
        # after the drain took plus IDLE_SECONDS: on a busy machine the worker lags behind the
        # agents by seconds, and a sweep running meanwhile sees busy sessions as idle (their
        # later events still queued) and expires them before the health sweep can judge them.
        services.start(
            "beat",
            ["beat", "--loglevel", "INFO", "--schedule", str(workdir / "beat-schedule")],
            SESSIONS_MAX_IDLE_SECONDS=str(IDLE_SECONDS + math.ceil(run.drain)),
        )
        settled = _wait_until(
            lambda: _settled(store, fleet), _to_settle(fleet), SETTLE_TIMEOUT, services
        )
    finally:
        services.stop()
    exact = _report(store, fleet, run)
    store.dispose()
    console.print(
        f"demo took {time.monotonic() - started:.1f}s, worker and beat start and stop included"
    )
    where = f"SESSIONS_DATABASE_URL={mask_url(settings.database_url)}"
    command = escape(_sessions_command())  # a path may hold "[", rich's markup
    console.print(
        f"look around: [bold]{escape(where)} {command} stats[/] (or [bold]{command} dashboard[/])",
        soft_wrap=True,
    )
    if not settled:
        console.print("[bold red]the sweeps did not settle every session in time")
    return 0 if settled and exact else 1


def _sessions_command() -> str:
    """How a shell runs this installation's ``sessions`` command: by name where ``PATH`` finds
    it, else by its path, quoted for the shell (``make demo``'s virtualenv is not on the
    caller's ``PATH``)."""
    beside = Path(sys.executable).parent / "sessions"
    found = shutil.which("sessions")
    if beside.exists() and (found is None or Path(found).resolve() != beside.resolve()):
        return shlex.quote(str(beside))
    return "sessions"


def _drive_fleet(config: DemoConfig, fleet: list[SimulatedSession], settings: Settings) -> FleetRun:
    """Record the fleet's requests round by round, then wait until the worker applied them."""
    rng = random.Random(config.seed)
    recorded = 0
    with (
        SessionTracker(settings) as tracker,
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        started = time.monotonic()
        task = progress.add_task("agents recording", total=config.requests_per_session)
        long_ago = datetime.now(UTC) - timedelta(minutes=2)
        for session in fleet:
            created = long_ago if session.kind == "old" else None
            tracker.create(
                session.session_id,
                user_id=session.user_id,
                metadata={"source": "demo", "kind": session.kind},
                at=created,
            )
        for round_number in range(config.requests_per_session):
            for session in fleet:
                if session.kind == "idle" and round_number >= 5:
                    continue
                tracker.record(
                    session.session_id,
                    processing_time=rng.lognormvariate(-1.5, 0.6),
                    error=rng.random() < session.error_rate,
                    user_id=session.user_id,
                )
                recorded += 1
            progress.advance(task)
            time.sleep(config.round_interval)
        for index, session in enumerate(fleet):
            if session.kind == "healthy" and index % 2 == 0:
                tracker.end(session.session_id, status="completed")
        recording = time.monotonic() - started
        progress.update(task, description="waiting for the worker")
        _flush_applied(tracker)
        drain = time.monotonic() - started - recording
    return FleetRun(recorded, recording, drain)


def _flush_applied(tracker: SessionTracker) -> None:
    """``flush(wait=True)`` for as long as the worker confirms batches: it raises
    :class:`FlushTimeoutError` only once no batch was applied for ``SETTLE_TIMEOUT``."""
    while True:
        unconfirmed = tracker.stats.batches_unconfirmed
        try:
            tracker.flush(wait=True, timeout=SETTLE_TIMEOUT)
            return
        except FlushTimeoutError:
            if tracker.stats.batches_unconfirmed >= unconfirmed:
                raise


#: What the sweeps should make of each kind of simulated session.
SWEPT_TO = {"failing": "failed", "idle": "expired", "old": "expired"}


def _to_settle(fleet: list[SimulatedSession]) -> int:
    """How many sessions of ``fleet`` the sweeps should end."""
    return sum(session.kind in SWEPT_TO for session in fleet)


def _settled(store: SessionStore, fleet: list[SimulatedSession]) -> int:
    """How many of them the sweeps have ended as they should."""
    ended = 0
    for session in fleet:
        if session.kind in SWEPT_TO:
            record = store.get(session.session_id)
            ended += record is not None and record.status == SWEPT_TO[session.kind]
    return ended


def _report(store: SessionStore, fleet: list[SimulatedSession], run: FleetRun) -> bool:
    """Print what the database holds; ``True`` when every recorded request was applied."""
    records = [r for r in (store.get(s.session_id) for s in fleet) if r is not None]
    by_status = Counter((r.status, r.end_reason or "-") for r in records)
    table = Table(title="sessions by status")
    table.add_column("status")
    table.add_column("ended by")
    table.add_column("sessions", justify="right")
    for (status, reason), count in sorted(by_status.items()):
        table.add_row(status, reason, str(count))
    console.print(table)

    users = sorted({s.user_id for s in fleet})
    per_user = Table(title="per-user aggregates (computed in SQL)")
    for column in ("user", "sessions", "requests", "errors", "error rate", "avg time", "p95"):
        per_user.add_column(column, justify="left" if column == "user" else "right")
    for user in users:
        a = store.aggregate(user_id=user)
        p95 = a.processing_time_p95
        per_user.add_row(
            user,
            str(a.sessions),
            str(a.request_count),
            str(a.error_count),
            f"{a.error_rate:.1%}",
            f"{a.average_processing_time * 1000:.0f} ms",
            "-" if p95 is None else f"{p95 * 1000:.0f} ms",
        )
    console.print(per_user)

    failed = [r for r in records if r.end_reason == "health"]
    console.print(
        f"health sweep ended {len(failed)} sessions: "
        + ", ".join(f"{r.session_id} ({r.error_rate:.0%} errors)" for r in failed[:8])
        + (" ..." if len(failed) > 8 else "")
    )
    applied = sum(r.request_count for r in records)
    console.print(
        f"{run.recorded} requests recorded in {run.recording:.1f}s "
        f"({run.recorded / run.recording:,.0f}/s, paced like a fleet), {applied} applied: "
        + ("[bold green]exact[/]" if applied == run.recorded else "[bold red]MISMATCH[/]")
        + f"; the last one was committed {run.drain * 1000:.0f} ms after it was recorded"
    )
    return applied == run.recorded
