"""Private PostgreSQL and Redis servers owned by one test, which it may stop and start at will.

The machine's PostgreSQL (5432) and Redis (6379) are shared with other users and must never be
stopped, so every fault scenario runs on servers of its own: a throwaway PostgreSQL cluster
(``initdb`` + ``pg_ctl``, trust authentication, its own port on 127.0.0.1, data under a temporary
directory) and a ``redis-server`` without persistence. Both are stopped by pid and deleted when
the test is done. When the binaries are missing the test is skipped with the reason, or fails
under ``SESSIONS_REQUIRE_SERVICES=1``.

``initdb`` refuses to run as root; as root the cluster belongs to the ``postgres`` OS user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.services import missing_service

#: Where PostgreSQL's server binaries are looked for (newest version first).
POSTGRES_BIN_ENV = "SESSIONS_FAULTS_POSTGRES_BIN"
#: How long a server may take to start or stop before the test fails.
SERVER_DEADLINE = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(condition: object, what: str, timeout: float = SERVER_DEADLINE) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


# -- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``."""
    candidates = [os.environ.get(POSTGRES_BIN_ENV, "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            candidates.append(
                subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).exists() for tool in ("initdb", "pg_ctl")):
            return Path(candidate)
    return None


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own on 127.0.0.1:``port``; stop/start it freely."""

    def __init__(self, bin_dir: Path, root: Path, owner: str | None):
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.owner = owner
        self.port = free_port()

    # The admin URL (database ``postgres``); databases for tests are created under it.
    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / arguments[0]), *arguments[1:]]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, check=check, timeout=SERVER_DEADLINE * 2
        )

    def initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.root}",
                "-c listen_addresses=127.0.0.1",
                # Throwaway data: durability across an OS crash is not what is tested here
                # (a stop, even an immediate one, keeps everything the OS was handed).
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        result = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w",
            "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(
                f"private PostgreSQL did not start:\n{result.stdout}{result.stderr}\n"
                f"{self.log_tail()}"
            )
        _wait(self.accepting, "the private PostgreSQL to accept connections")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (orderly) or ``immediate`` (as a crash would)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)
        pid = self.pid()
        if pid is not None and _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _port_open(self.port), "the private PostgreSQL to stop")

    def pid(self) -> int | None:
        """The postmaster's pid, from its pid file (``None`` when not running)."""
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def accepting(self) -> bool:
        engine = create_engine(self.admin_url, connect_args={"connect_timeout": 2})
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:
            return False
        finally:
            engine.dispose()

    def create_database(self, name: str) -> str:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop the server by pid if it still runs, then delete its files."""
        pid = self.pid()
        if pid is not None and _pid_alive(pid):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(AssertionError):
                _wait(lambda: not _pid_alive(pid), "the private PostgreSQL to exit", 10)
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_owner() -> str | None:
    """The OS user the cluster runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing_service("running as root and there is no `postgres` OS user to own a cluster")
    if shutil.which("runuser") is None:
        missing_service("running as root and `runuser` is missing (initdb refuses root)")
    return "postgres"


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL cluster, destroyed afterwards."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        missing_service(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin, "
            f"pg_config --bindir or ${POSTGRES_BIN_ENV}"
        )
        raise AssertionError("unreachable")  # pragma: no cover
    owner = _postgres_owner()
    root = Path(tempfile.mkdtemp(prefix="sessions-faults-pg-"))
    if owner is not None:
        shutil.chown(root, user=owner)
    server = PrivatePostgres(bin_dir, root, owner)
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.destroy()


# -- Redis ------------------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of this test's own on 127.0.0.1:``port``, without persistence."""

    def __init__(self, binary: str, root: Path):
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        _wait(self.answering, "the private Redis to answer")

    def answering(self) -> bool:
        import redis

        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"private redis-server exited with {self.process.returncode}: "
                + (self.root / "redis.log").read_text(errors="replace")[-2000:]
            )
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except Exception:
            return False

    def client(self) -> object:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=SERVER_DEADLINE)
        self.process = None


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A running private Redis server, killed (by pid) and deleted afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not on PATH (needed for a private Redis server)")
        raise AssertionError("unreachable")  # pragma: no cover
    root = Path(tempfile.mkdtemp(prefix="sessions-faults-redis-"))
    server = PrivateRedis(binary, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
