"""docker-compose.yml's health checks of the worker and beat, run for real (no Docker here).

The worker and beat are started with the commands compose gives them, on a private
``redis-server``, and each health check is run as the container's shell would run it, with
``HOSTNAME`` set to this host's name (a container's ``HOSTNAME`` is its host name). A check
must pass on a running service, fail while Redis is dead, pass again once the service has
reconnected on its own, and fail once the service is gone.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faults.servers import PrivateRedis, private_redis
from tests.support.workers_harness import (
    INSTALLED_APP,
    CeleryProcess,
    service_environment,
    wait_until,
)

pytestmark = [pytest.mark.slow]

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
#: Seconds one health check may take: compose's own ``timeout`` for it.
CHECK_TIMEOUT = 20.0
#: Celery's consumer retries a lost broker after 2, 4, 6 ... s; Redis is dead for a few
#: seconds here, so the worker is back within one 6 s gap, a connect and a mingle, and a
#: ping answered within compose's retries x interval is what "healthy again" means there.
RECOVERY_DEADLINE = 90.0


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


def healthy(service: dict[str, Any], environment: dict[str, str]) -> bool:
    """Run ``service``'s health check as Docker would (``CMD-SHELL``: ``/bin/sh -c``)."""
    kind, line = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = line.replace("$$", "$")  # compose's escape: the shell sees "$HOSTNAME"
    celery = str(Path(sys.executable).with_name("celery"))
    command = command.replace("celery ", f"{celery} ", 1)
    result = subprocess.run(
        ["/bin/sh", "-c", command],
        env={**environment, "HOSTNAME": socket.gethostname()},
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT * 3,  # the import of the app on a busy machine, then the ping
    )
    return result.returncode == 0


def started(
    name: str, service: dict[str, Any], environment: dict[str, str], logs: Path
) -> CeleryProcess:
    command = [str(word) for word in service["command"]]
    assert command[:3] == ["celery", "-A", INSTALLED_APP], command
    arguments = [
        str(logs / "celerybeat-schedule") if word == "/tmp/celerybeat-schedule" else word
        for word in command[3:]
    ]
    return CeleryProcess(name, arguments, environment, logs, app=INSTALLED_APP)


def test_worker_and_beat_health_checks_follow_them_through_a_broker_restart(
    compose: dict[str, Any], redis_server: PrivateRedis, tmp_path: Path
) -> None:
    environment = service_environment(
        SESSIONS_BROKER_URL=redis_server.url,
        SESSIONS_DATABASE_URL=f"sqlite:///{tmp_path / 'sessions.db'}",
    )
    services = compose["services"]
    worker = started("worker", services["worker"], environment, tmp_path)
    beat = started("beat", services["beat"], environment, tmp_path)
    try:
        worker.wait_for_log(r"@\S+ ready\.", timeout=60)
        beat.wait_for_log(r"beat: Starting", timeout=60)
        for name in ("worker", "beat"):
            wait_until(
                lambda name=name: healthy(services[name], environment),  # type: ignore[misc]
                timeout=RECOVERY_DEADLINE,
                message=f"the {name}'s health check to pass",
            )

        redis_server.stop()  # SIGKILL
        assert not healthy(services["worker"], environment)
        assert not healthy(services["beat"], environment)
        redis_server.start()
        for name in ("worker", "beat"):
            wait_until(
                lambda name=name: healthy(services[name], environment),  # type: ignore[misc]
                timeout=RECOVERY_DEADLINE,
                message=f"the {name}'s health check to pass again after Redis came back",
            )
        assert worker.process.poll() is None and beat.process.poll() is None

        for process in (worker, beat):
            process.stop()
        assert not healthy(services["worker"], environment)
        assert not healthy(services["beat"], environment)
    finally:
        for process in (worker, beat):
            process.stop()
