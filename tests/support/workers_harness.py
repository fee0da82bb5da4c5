"""Running the pipeline for real in tests: Celery subprocesses, a Redis db, a cuttable TCP proxy,
and reading a worker's Prometheus endpoint.

Everything here waits on conditions with deadlines (never a bare sleep) and cleans up after
itself: every subprocess is stopped, every claimed Redis database flushed.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessions.errors import FlushTimeoutError
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.support import diagnostics
from tests.support.services import (
    REDIS_URL,
    require_postgres,
    require_redis,
    temporary_postgres_database,
)
from tests.support.waiting import STALL, cpu_budget, cpu_progress, wait_for

#: The repository root: Celery subprocesses run here, so the checkout's ``workers`` imports.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The app a checkout runs (the README's ``celery -A workers``); an installed package's is
#: :data:`INSTALLED_APP`.
CHECKOUT_APP = "workers"
INSTALLED_APP = "sessions.worker"
#: How long a test waits without progress for a worker to start or for its effects to show.
DEADLINE = 30.0
#: CPU seconds a Celery process may use before it logs what a test waits for (starting one
#: costs one or two, on a busy machine as on an idle one).
CELERY_CPU_BUDGET = 60.0


def wait_until(
    condition: Callable[[], object],
    timeout: float = DEADLINE,
    message: str = "condition",
    progress: Callable[[], Hashable] | None = None,
) -> None:
    """Return once ``condition()`` is truthy; fail once ``progress`` has stood still for
    ``timeout`` seconds (see :mod:`tests.support.waiting`).

    ``progress`` defaults to :func:`worker_activity` while the test has Celery workers
    running (what a test waits for, they do, however slowly a busy machine lets them), else
    the wait is a plain deadline of ``timeout`` seconds.
    """
    if progress is None and _running_workers:
        progress = worker_activity
    wait_for(condition, message, progress=progress, stall=timeout)


#: Seconds one ``flush(wait=True)`` of :func:`flush_applied` waits before progress is checked.
FLUSH_SLICE = 5.0


def flush_applied(tracker: SessionTracker, timeout: float = DEADLINE) -> None:
    """``tracker.flush(wait=True)``, for as long as the pipeline makes progress: fails once
    neither the workers' logs (:func:`worker_activity`) nor the tracker's published events
    changed for ``timeout`` seconds. :class:`BrokerUnavailableError` propagates."""
    last_error: list[FlushTimeoutError] = []

    def flushed() -> bool:
        try:
            tracker.flush(wait=True, timeout=FLUSH_SLICE)
        except FlushTimeoutError as exc:
            last_error[:] = [exc]
            return False
        return True

    try:
        wait_for(
            flushed,
            "every event recorded to be applied",
            progress=lambda: (worker_activity(), tracker.stats.events_sent),
            stall=timeout,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the tracker said: {last_error[-1:]}") from None


def run_to_completion(
    arguments: list[str], timeout: float = STALL, **options: Any
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(arguments, capture_output=True, text=True, **options)``, waiting for as
    long as the run makes progress: fails (killing it) once neither its processes' CPU time
    nor the workers' logs advanced for ``timeout`` seconds."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(arguments, stdout=out, stderr=err, text=True, **options)
        watched = cpu_progress(process.pid)
        try:
            wait_for(
                lambda: process.poll() is not None,
                f"{' '.join(arguments)} to finish",
                progress=lambda: (watched(), worker_activity()),
                stall=timeout,
            )
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(arguments, process.returncode, out.read(), err.read())


#: The Celery workers this test process has running (started, not yet stopped).
_running_workers: set[CeleryProcess] = set()


def worker_activity() -> int:
    """Bytes the running Celery workers have logged so far: it grows while they receive,
    apply, retry or reconnect, and stands still while they idle or hang."""
    total = 0
    for worker in list(_running_workers):
        with suppress(OSError):
            total += worker.log_path.stat().st_size
    return total


def service_environment(**values: str) -> dict[str, str]:
    """This process's environment without any ``SESSIONS_*`` setting, plus ``values``.

    The test's private spool folder is kept, so no subprocess touches the user's own spool.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONS_")}
    environment["PYTHONUNBUFFERED"] = "1"
    if "SESSIONS_SPOOL_DIR" in os.environ:
        environment["SESSIONS_SPOOL_DIR"] = os.environ["SESSIONS_SPOOL_DIR"]
    environment.update(values)
    return environment


class CeleryProcess:
    """One ``celery -A <app> <command>`` subprocess, logging to a file; ``app`` defaults to
    the checkout's, :data:`CHECKOUT_APP`."""

    def __init__(
        self,
        name: str,
        arguments: list[str],
        environment: Mapping[str, str],
        logs: Path,
        app: str = CHECKOUT_APP,
    ):
        self.name = name
        self.log_path = logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, *arguments],
            cwd=REPO_ROOT,
            env=dict(environment),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # A group of its own, so that stopping it also reaches its prefork children.
            start_new_session=True,
        )
        if name == "worker":
            _running_workers.add(self)
        self._source = diagnostics.register(
            f"{name} (pid {self.process.pid}), last lines of its log", lambda: self.log
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log))

    def wait_for_log(self, pattern: str, timeout: float = DEADLINE) -> None:
        """Wait for ``pattern`` in the log while the process works towards it: fail if it
        exits, uses no CPU for ``timeout`` seconds, or :data:`CELERY_CPU_BUDGET` seconds in
        all (a busy machine slows a start down; it does not make it cost more)."""

        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log[-3000:]}"
                )
            return re.search(pattern, self.log) is not None

        try:
            wait_for(
                seen,
                f"{pattern!r} in the {self.name} log",
                progress=cpu_progress(self.process.pid),
                stall=timeout,
                budget=cpu_budget(CELERY_CPU_BUDGET),
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log[-3000:]}") from None

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the whole group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        _running_workers.discard(self)
        diagnostics.unregister(self._source)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()


def start_worker(environment: Mapping[str, str], logs: Path, concurrency: int = 2) -> CeleryProcess:
    """A prefork worker on both queues, ready to consume when this returns."""
    worker = CeleryProcess(
        "worker",
        [
            "worker",
            "--loglevel=INFO",
            f"--concurrency={concurrency}",
            "--pool=prefork",
            f"--hostname=test-{uuid.uuid4().hex[:8]}@%h",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
        ],
        environment,
        logs,
    )
    try:
        worker.wait_for_log(r"@\S+ ready\.")
    except BaseException:
        worker.stop()
        raise
    return worker


def start_beat(environment: Mapping[str, str], logs: Path) -> CeleryProcess:
    beat = CeleryProcess(
        "beat",
        [
            "beat",
            "--loglevel=INFO",
            f"--schedule={logs / ('beat-schedule-' + uuid.uuid4().hex[:6])}",
            "--max-interval=1",
        ],
        environment,
        logs,
    )
    try:
        beat.wait_for_log(r"beat: Starting")
    except BaseException:
        beat.stop()
        raise
    return beat


@dataclass
class Pipeline:
    """A running worker (and maybe beat) with the settings a client uses to reach it."""

    settings: Settings
    store: SessionStore
    worker: CeleryProcess
    beat: CeleryProcess | None = None


@contextmanager
def running_pipeline(
    logs: Path,
    *,
    beat: bool = False,
    database_url: Callable[[str], str] = lambda url: url,
    **environment: str,
) -> Iterator[Pipeline]:
    """A fresh PostgreSQL database, a claimed Redis database, a worker (and beat) on them.

    ``database_url`` maps the database's URL to the one the worker is given (a proxy's).
    """
    require_postgres()
    require_redis()
    with ExitStack() as stack:
        url = stack.enter_context(temporary_postgres_database("sessions_workers"))
        broker = stack.enter_context(claimed_redis_db())
        env = service_environment(
            SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=database_url(url), **environment
        )
        worker = start_worker(env, logs)
        stack.callback(worker.stop)
        scheduler = None
        if beat:
            scheduler = start_beat(env, logs)
            stack.callback(scheduler.stop)
        settings = Settings(broker_url=broker, database_url=url)
        store = SessionStore(url, settings=settings)
        stack.callback(store.dispose)
        yield Pipeline(settings, store, worker, scheduler)


@contextmanager
def claimed_redis_db() -> Iterator[str]:
    """The URL of an empty Redis database claimed for this test, flushed afterwards.

    Databases 1-15 are tried in turn; a marker key taken with ``SET NX`` keeps two test runs
    on the same Redis from sharing one.
    """
    import redis

    marker = f"sessions-test-claim-{uuid.uuid4().hex}"
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}", socket_timeout=2)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, marker, nx=True, ex=CLAIM_SECONDS):
            released = threading.Event()
            # The marker lives CLAIM_SECONDS unless renewed, so a claimer that died frees its
            # database; a live one renews it for as long as it holds the database, however long
            # (a bench holding a database it has not written to yet must not lose it).
            renewer = threading.Thread(
                target=_renew_claim, args=(client, released), name="redis-claim", daemon=True
            )
            renewer.start()
            try:
                yield f"{REDIS_URL}/{number}"
            finally:
                released.set()
                renewer.join()
                client.flushdb()
                client.close()
            return
        client.close()
    raise AssertionError("no free Redis database among 1-15")


#: The key whose presence marks a Redis database claimed (:func:`claimed_redis_db`) ...
CLAIM_KEY = "sessions-test-claim"
#: ... and the seconds it lives without renewal.
CLAIM_SECONDS = 900


def _renew_claim(client: Any, released: threading.Event) -> None:
    """Keep ``CLAIM_KEY`` alive until ``released`` (a test that flushed it keeps it flushed)."""
    import redis

    while not released.wait(CLAIM_SECONDS / 10):
        with suppress(redis.RedisError):
            client.expire(CLAIM_KEY, CLAIM_SECONDS)


class TcpProxy:
    """A TCP relay to ``target`` on a local port, which a test can cut and restore.

    Cutting closes every relayed connection and refuses new ones (accepted, then closed at
    once), as a database server that went away would; restoring relays again.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._cut = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in list(self._peers):
                self._close(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stopped = True
        self._thread.join(5)
        with self._lock:
            for sock in list(self._peers):
                self._close(sock)
        self._selector.close()
        self._listener.close()

    def _run(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(timeout=0.05):
                with self._lock:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept()
                    elif sock in self._peers:
                        self._relay(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._cut:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(True)
            sock.settimeout(5)
            self._selector.register(sock, selectors.EVENT_READ)
        self._peers[client], self._peers[upstream] = upstream, client

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if data:
            try:
                self._peers[sock].sendall(data)
                return
            except OSError:
                pass
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        other = self._peers.pop(sock, None)
        for each in (sock, other):
            if each is None:
                continue
            self._peers.pop(each, None)
            with suppress(KeyError, ValueError):
                self._selector.unregister(each)
            with suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()


class SilentServer:
    """Accepts TCP connections and never answers: a broker that hangs instead of refusing."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="silent-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(connection)

    def close(self) -> None:
        self._stopped = True
        self._thread.join(5)
        for connection in self._held:
            connection.close()
        self._listener.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a worker's endpoint)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Scrape:
    """One read of a Prometheus endpoint: every sample's value by name and labels."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    #: The response's ``Content-Type``.
    content_type: str

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels``, or ``None`` if it is not exported."""
        return self.samples.get((name, frozenset(labels.items())))


def scrape_metrics(port: int, host: str = "127.0.0.1") -> Scrape:
    """GET ``/metrics`` over HTTP and parse it with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
        content_type = response.headers.get("Content-Type", "")
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Scrape(samples, content_type)
