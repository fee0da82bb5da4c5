"""``sessions dashboard`` as an operator runs it: its port option, and uvicorn's access log.

The server runs as a subprocess on a port the system picks (``--port 0``), and the test
reads the address from the server's own log line, as an operator would.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from sessions.cli import app
from sessions.redact import decode
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.waiting import cpu_progress, wait_for
from tests.support.workers_harness import REPO_ROOT, service_environment

TOKEN = "s3cret-token-for-tests-only"
#: How long the server may use no CPU while the test waits for it (a busy machine).
STALL = 30.0


@pytest.mark.parametrize("port", ["70000", "65536", "-1", "http"])
def test_a_port_that_is_no_tcp_port_is_refused_naming_the_option(port: str) -> None:
    result = CliRunner().invoke(app, ["dashboard", "--port", port])
    assert result.exit_code == 2
    assert "Invalid value for '--port'" in result.output
    assert "Traceback" not in result.output


class Dashboard:
    """A ``sessions dashboard --port 0`` subprocess and its log."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.log_path = tmp_path / "dashboard.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sessions.cli", "dashboard", "--port", "0"],
            cwd=REPO_ROOT,
            env=service_environment(
                SESSIONS_DATABASE_URL=database_url, SESSIONS_DASHBOARD_TOKEN=TOKEN
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = int(self.wait_for_log(r"Uvicorn running on http://127\.0\.0\.1:(\d+)"))

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str) -> str:
        """The first group of ``pattern`` once it is in the log (fails if the server exits)."""

        def seen() -> re.Match[str] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the dashboard exited:\n{self.log[-3000:]}")
            return re.search(pattern, self.log)

        wait_for(
            seen,
            f"{pattern!r} in the dashboard log",
            progress=cpu_progress(self.process.pid),
            stall=STALL,
        )
        found = seen()
        assert found is not None
        return found.group(1) if found.groups() else found.group(0)

    def get(self, target: str, headers: dict[str, str] | None = None) -> int:
        """The status of ``GET target`` (sent as it is: no client re-encodes it)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STALL)
        try:
            connection.request("GET", target, headers=headers or {})
            return connection.getresponse().status
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                self.process.wait(timeout=STALL)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    store = SessionStore(url, settings=Settings())
    store.upgrade()
    store.dispose()
    server = Dashboard(tmp_path, url)
    try:
        yield server
    finally:
        server.stop()


def test_port_zero_serves_on_a_free_port_the_log_names(dashboard: Dashboard) -> None:
    assert dashboard.port not in (0, 8750)
    assert dashboard.get("/", {"Authorization": f"Bearer {TOKEN}"}) == 200


def test_the_access_log_never_holds_the_token(dashboard: Dashboard) -> None:
    """The issue's probe: ``/?%74oken=<token>`` logged in, and was logged in clear."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    encoded = "".join(f"%{ord(c):02X}" for c in TOKEN)
    requests = [
        (f"/?%74oken={TOKEN}", {}, 303),
        (f"/?token={TOKEN}&top=5", {}, 303),
        (f"/?%74%6F%6B%65%6E={encoded}", {}, 303),
        (f"/?token={quote(TOKEN).replace('s', '%73')}", {}, 303),
        (f"/sessions?user={TOKEN}", bearer, 200),
        (f"/{TOKEN}", bearer, 404),
    ]
    for target, headers, status in requests:
        assert dashboard.get(target, headers) == status, target
    # uvicorn writes an access line once the response is sent: wait for the last one.
    dashboard.wait_for_log(r'"GET \*\*\* HTTP/1\.1" 404')
    dashboard.stop()
    log = dashboard.log
    assert log.count('"GET ') == len(requests), log
    assert '"GET /?%74oken=*** HTTP/1.1" 303' in log
    assert '"GET /?token=***&top=5 HTTP/1.1" 303' in log
    assert '"GET /sessions?user=*** HTTP/1.1" 200' in log
    assert TOKEN not in log and TOKEN not in decode(log)
