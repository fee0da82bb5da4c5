"""Private PostgreSQL, Redis and RabbitMQ servers owned by tests, which may stop and start them.

The machine's PostgreSQL (5432), Redis (6379) and RabbitMQ (5672) are shared with other users
and must never be stopped, so every fault scenario runs on servers of its own: a throwaway
PostgreSQL cluster (``initdb``, then ``postgres`` in the foreground; trust authentication, its
own port on 127.0.0.1, data under a temporary directory), a ``redis-server`` without
persistence, and a RabbitMQ node (its own node name, ports, data, logs and Erlang cookie).

All are child processes of the test process, stopped through their own process handle (a
stop "mode" is the signal ``pg_ctl`` would send: SIGINT fast, SIGQUIT immediate) and deleted
when the test is done; all also carry a parent-death signal, so even a test run that is killed
outright leaves no server behind (and the next run deletes its stale files). When the binaries
are missing the test is skipped with the reason, or fails under ``SESSIONS_REQUIRE_SERVICES=1``.

``initdb`` and ``postgres`` refuse to run as root; as root the cluster belongs to the
``postgres`` OS user.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.support import diagnostics
from tests.support.services import missing_service
from tests.support.waiting import cpu_progress, wait_for
from tests.support.workers_harness import free_port, run_to_completion

#: Where PostgreSQL's server binaries are looked for (newest version first).
POSTGRES_BIN_ENV = "SESSIONS_FAULTS_POSTGRES_BIN"
#: How long a server may go without progress while it starts or stops before the test fails.
SERVER_DEADLINE = 30.0
#: ``prctl`` option: the signal a process gets when its parent exits.
PR_SET_PDEATHSIG = 1
#: Temporary directories of the private servers.
POSTGRES_PREFIX = "sessions-faults-pg-"
REDIS_PREFIX = "sessions-faults-redis-"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(
    condition: Callable[[], object], what: str, timeout: float = SERVER_DEADLINE, pid: int = 0
) -> None:
    """Wait for ``condition``; while the server ``pid`` is at work (its CPU time grows: a
    start, a crash recovery), ``timeout`` seconds without progress."""
    wait_for(condition, what, progress=cpu_progress(pid) if pid else None, stall=timeout)


def _remove_stale(
    prefix: str, max_age: float = 3600.0, pid_file_name: str = "data/postmaster.pid"
) -> None:
    """Delete what killed test runs left under ``prefix`` (no live server, over an hour old)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), prefix + "*")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(path) < max_age:
                continue
            pid_file = Path(path) / pid_file_name
            if pid_file.exists():
                pid = int(pid_file.read_text().splitlines()[0])
                if Path(f"/proc/{pid}").exists():
                    continue
            shutil.rmtree(path, ignore_errors=True)


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
    """A PostgreSQL cluster of this test's own on 127.0.0.1:``port``; stop/start it freely.

    The postmaster runs in the foreground as a child of the test process (not daemonized by
    ``pg_ctl``), with a parent-death signal: if the test process itself is killed, the server
    goes with it instead of lingering on the shared machine.
    """

    def __init__(self, bin_dir: Path, root: Path, owner: str | None):
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.owner = owner
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    # The admin URL (database ``postgres``); databases for tests are created under it.
    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def initdb(self) -> None:
        result = run_to_completion(
            [str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
             "postgres", "-E", "UTF8", "--no-sync"],
            SERVER_DEADLINE, preexec_fn=_child_setup(self.owner), cwd=self.root,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
             # Throwaway data: durability across an OS crash is not what is tested here
             # (a stop, even an immediate one, keeps everything the OS was handed).
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
             # Little WAL kept on disk (a checkpoint at every 64 MB of it; nothing here
             # replicates or archives): the suite must fit on a machine with little free disk.
             "-c", "wal_level=minimal", "-c", "max_wal_senders=0",
             "-c", "max_wal_size=64MB", "-c", "min_wal_size=32MB"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup(self.owner),
            cwd=self.root,
        )  # fmt: skip
        log.close()

        def accepting() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"private PostgreSQL exited:\n{self.log_tail()}")
            return self.accepting()

        _wait(accepting, "the private PostgreSQL to accept connections", pid=self.process.pid)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (orderly, SIGINT) or ``immediate`` (as a crash, SIGQUIT)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
            try:
                self.process.wait(timeout=SERVER_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        _wait(lambda: not _port_open(self.port), "the private PostgreSQL to stop")

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
        # PostgreSQL 15 copies the template through WAL by default (some 7 MB per database);
        # FILE_COPY copies its files and logs a few hundred bytes.
        strategy = " STRATEGY = FILE_COPY" if self._server_version() >= (15,) else ""
        self._admin(f'CREATE DATABASE "{name}"{strategy}')
        return self.url(name)

    def _server_version(self) -> tuple[int, ...]:
        engine = create_engine(self.admin_url)
        try:
            with engine.connect() as connection:
                return tuple(connection.dialect.server_version_info or ())
        finally:
            engine.dispose()

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection still open to it."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(statement))
        finally:
            engine.dispose()

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop the server (immediately) if it still runs, then delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _child_setup(owner: str | None) -> Callable[[], None]:
    """``preexec_fn`` of a server process: become ``owner``, and die with the test process."""
    uid = gid = None
    if owner is not None:
        entry = pwd.getpwnam(owner)
        uid, gid = entry.pw_uid, entry.pw_gid

    def setup() -> None:
        os.setsid()  # keep the server out of the test's terminal signals (Ctrl-C)
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # After the change of user: a change of credentials clears the parent-death signal.
        _die_with_parent()

    return setup


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (a no-op elsewhere)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _postgres_owner() -> str | None:
    """The OS user the cluster runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing_service("running as root and there is no `postgres` OS user to own a cluster")
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
    _remove_stale(POSTGRES_PREFIX)
    root = Path(tempfile.mkdtemp(prefix=POSTGRES_PREFIX))
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
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup(None),
        )  # fmt: skip
        log.close()
        _wait(self.answering, "the private Redis to answer", pid=self.process.pid)

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

    def empty(self) -> bool:
        """Nothing queued for ingest and nothing delivered but unacknowledged."""
        import redis

        client = redis.Redis(port=self.port, socket_timeout=5)
        return int(client.llen("sessions.events")) == 0 and int(client.hlen("unacked")) == 0

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
    _remove_stale(REDIS_PREFIX)
    root = Path(tempfile.mkdtemp(prefix=REDIS_PREFIX))
    server = PrivateRedis(binary, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- RabbitMQ ---------------------------------------------------------------------------------

#: Where RabbitMQ's scripts (``rabbitmq-server``, ``rabbitmqctl``) are looked for first.
RABBITMQ_BIN_ENV = "SESSIONS_FAULTS_RABBITMQ_BIN"
#: Temporary directories of the private RabbitMQ nodes.
RABBITMQ_PREFIX = "sessions-faults-rabbitmq-"
#: Seconds a private node may boot (an Erlang VM, Mnesia, the quorum queue system) without its
#: CPU time growing; and the longest an orderly stop may take.
RABBITMQ_DEADLINE = 90.0


def rabbitmq_bin_dir() -> Path | None:
    """The directory holding the real ``rabbitmq-server`` and ``rabbitmqctl``, or ``None``.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the ``rabbitmq`` user
    and its files; the scripts it wraps take every path from ``RABBITMQ_*`` variables.
    """
    candidates = [os.environ.get(RABBITMQ_BIN_ENV, ""), "/usr/lib/rabbitmq/bin"]
    candidates += sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"), reverse=True)
    for candidate in candidates:
        if candidate and all(
            (Path(candidate) / tool).exists() for tool in ("rabbitmq-server", "rabbitmqctl")
        ):
            return Path(candidate)
    return None


class PrivateRabbitMQ:
    """A RabbitMQ node of this test's own on 127.0.0.1:``port``; stop, kill and start it freely.

    Everything it reads or writes is under ``root``: its configuration (one AMQP listener on
    loopback, no plugins, so no management or Prometheus port), its data and logs, its Erlang
    cookie (``HOME``). Its node name and distribution port are its own, so it never meets the
    machine's node (the shared ``epmd`` only maps names to ports). The Erlang VM replaces the
    start script (``RUNNING_UNDER_SYSTEMD``), so it is the test's own child and carries the
    parent-death signal. Data persists across a stop or a kill, as a real node's does.
    """

    def __init__(self, bin_dir: Path, root: Path):
        self.bin_dir = bin_dir
        self.root = root
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"faults-{uuid.uuid4().hex[:10]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "rabbitmq.out"
        home = root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")
        self._source = diagnostics.register(f"private RabbitMQ {self.node}", self.describe)

    def environment(self) -> dict[str, str]:
        """The ``RABBITMQ_*`` variables that confine the node (and ``rabbitmqctl``) to ``root``."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root / "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # Not /etc/rabbitmq/rabbitmq-env.conf, which names the machine's node.
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # Exec the Erlang VM instead of keeping a shell in between (see the class doc).
            "RUNNING_UNDER_SYSTEMD": "1",
        }

    def url(self, vhost: str = "/") -> str:
        from urllib.parse import quote

        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def start(self) -> None:
        """Start the node and wait until it accepts an AMQP connection."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(self.bin_dir / "rabbitmq-server")],
            env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(None), cwd=self.root,
        )  # fmt: skip
        log.close()
        _wait(
            self.answering,
            "the private RabbitMQ to accept AMQP connections",
            RABBITMQ_DEADLINE,
            pid=self.process.pid,  # the Erlang VM itself (RUNNING_UNDER_SYSTEMD: exec, no shell)
        )

    def answering(self) -> bool:
        from kombu import Connection

        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"private rabbitmq-server exited with {self.process.returncode}:\n"
                + self.log_tail()
            )
        if not _port_open(self.port):
            return False
        try:
            with Connection(self.url(), connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=1)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """An orderly shutdown (SIGTERM: the node stops its listeners, queues and Mnesia)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash: SIGKILL the Erlang VM and its helper processes (the node's process group)."""
        self._end(signal.SIGKILL)

    def _end(self, signum: int) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)
            try:
                self.process.wait(timeout=RABBITMQ_DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # helpers that outlived the VM
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        _wait(lambda: not _port_open(self.port), "the private RabbitMQ to stop")

    def ctl(self, *arguments: str, timeout: float = SERVER_DEADLINE) -> str:
        """Run ``rabbitmqctl`` against this node; its output (raises when it fails, or
        after ``timeout`` seconds)."""
        result = subprocess.run(
            [str(self.bin_dir / "rabbitmqctl"), "-n", self.node, *arguments],
            env=self.environment(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(arguments)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def add_vhost(self, vhost: str) -> str:
        """Create ``vhost``, open it to ``guest``; its AMQP URL."""
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return self.url(vhost)

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost)

    def messages(self, vhost: str) -> int:
        """Messages in every queue of ``vhost``: ready, delivered but unacknowledged, and
        waiting in the delayed-delivery queues for a retry's countdown."""
        listed = self.ctl("list_queues", "-p", vhost, "messages", "--quiet", "--no-table-headers")
        return sum(int(line) for line in listed.split() if line.strip().isdigit())

    def log_tail(self, characters: int = 3000) -> str:
        texts = [self.log_path.read_text(errors="replace")] if self.log_path.exists() else []
        texts += [path.read_text(errors="replace") for path in (self.root / "log").glob("*.log")]
        return "\n".join(text[-characters:] for text in texts)

    def describe(self) -> str:
        """The node's last warnings and errors (a resource alarm is one), then every queue of
        every vhost: type, state, messages ready / unacknowledged, consumers."""
        log = "\n".join(
            path.read_text(errors="replace") for path in (self.root / "log").glob("*.log")
        )
        notable = [line for line in log.splitlines() if "[warning]" in line or "[error]" in line]
        lines = notable[-6:]
        if self.process is None or self.process.poll() is not None:
            return "\n".join([*lines, "(the node is not running)"])
        # A short deadline: this runs after a wait has already failed (a hung node raises).
        for vhost in self.ctl("list_vhosts", "--quiet", "--no-table-headers", timeout=5).split():
            queues = self.ctl(
                "list_queues", "-p", vhost, "name", "type", "state", "messages_ready",
                "messages_unacknowledged", "consumers", "--quiet", "--no-table-headers",
                timeout=5,
            )  # fmt: skip
            lines += [f"{vhost}: {' '.join(q.split())}" for q in queues.splitlines() if q.strip()]
        return "\n".join(lines)

    def destroy(self) -> None:
        diagnostics.unregister(self._source)
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A running private RabbitMQ node, killed (by process group) and deleted afterwards."""
    bin_dir = rabbitmq_bin_dir()
    if bin_dir is None:
        missing_service(
            "RabbitMQ's rabbitmq-server and rabbitmqctl not found in /usr/lib/rabbitmq/bin "
            f"or ${RABBITMQ_BIN_ENV} (needed for a private RabbitMQ node)"
        )
        raise AssertionError("unreachable")  # pragma: no cover
    if shutil.which("erl") is None:
        missing_service("Erlang (erl) is not on PATH (needed for a private RabbitMQ node)")
    _remove_stale(RABBITMQ_PREFIX, pid_file_name="rabbitmq.pid")
    root = Path(tempfile.mkdtemp(prefix=RABBITMQ_PREFIX))
    server = PrivateRabbitMQ(bin_dir, root)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


# -- a scenario's broker, whichever it is -------------------------------------------------------


@dataclass
class FaultBroker:
    """The broker one scenario publishes to: a private Redis, or a vhost of a private RabbitMQ.

    ``kind`` is ``"redis"`` or ``"amqp"``; ``redis`` / ``rabbitmq`` is the server behind it
    (a test that stops the broker owns that server; one that does not may share a node).
    """

    kind: str
    url: str
    redis: PrivateRedis | None = None
    rabbitmq: PrivateRabbitMQ | None = None
    vhost: str = "/"

    def label(self, scenario: str) -> str:
        """``scenario``'s name in the report: Redis rows as they always were, RabbitMQ's marked."""
        return scenario if self.kind == "redis" else f"{scenario} (RabbitMQ)"

    def empty(self) -> bool:
        """The broker holds no message for the pipeline: none queued, none delivered and not
        yet acknowledged, none waiting for a retry's countdown."""
        if self.redis is not None:
            return self.redis.empty()
        assert self.rabbitmq is not None
        return self.rabbitmq.messages(self.vhost) == 0
