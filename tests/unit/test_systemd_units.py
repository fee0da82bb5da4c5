"""docs/systemd's example units: the README's commands, restarted on failure, valid for systemd."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "docs" / "systemd"
#: Where the units expect the project's virtualenv and environment file.
INSTALLED_CELERY = "/opt/agent-sessions/venv/bin/celery"
ENVIRONMENT_FILE = "/etc/agent-sessions/env"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


def readme_command(subcommand: str) -> list[str]:
    """The ``celery -A sessions.worker <subcommand>`` line of the README's production section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running it in production", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        words = shlex.split(line.split("#", 1)[0])
        if words[:4] == ["celery", "-A", "sessions.worker", subcommand]:
            return words
    raise AssertionError(
        f"no `celery -A sessions.worker {subcommand}` in the README's production section"
    )


@pytest.mark.parametrize(
    ("name", "subcommand"),
    [("sessions-worker.service", "worker"), ("sessions-beat.service", "beat")],
)
def test_a_unit_runs_the_readmes_command_and_restarts_it_on_failure(
    name: str, subcommand: str
) -> None:
    parsed = unit(name)
    service = parsed["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0] == INSTALLED_CELERY
    readme = readme_command(subcommand)
    assert ["celery", *command[1:]][: len(readme)] == readme, (command, readme)
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == ENVIRONMENT_FILE
    assert service["Type"] == "exec"  # Celery runs in the foreground: no forking, no pid file
    # Restarting forever is a [Unit] setting: in [Service] systemd ignores it.
    assert parsed["Unit"]["StartLimitIntervalSec"] == "0"
    assert "StartLimitIntervalSec" not in service


def test_the_worker_is_stopped_by_a_warm_shutdown_of_its_main_process() -> None:
    service = unit("sessions-worker.service")["Service"]
    # SIGTERM to the main process only (it stops its pool processes itself), SIGKILL to what
    # is left after the timeout.
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 0


def test_beat_answers_pings_for_a_health_check() -> None:
    command = shlex.split(unit("sessions-beat.service")["Service"]["ExecStart"])
    assert "--enable-remote-control" in command


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on copies that point at this virtualenv's celery (it checks
    that the command exists) and at the example environment file."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    celery = str(Path(sys.executable).with_name("celery"))
    copies = []
    for source in sorted(UNITS.glob("*.service")):
        text = source.read_text().replace(INSTALLED_CELERY, celery)
        text = text.replace(ENVIRONMENT_FILE, str(UNITS / "env.example"))
        copy = tmp_path / source.name
        copy.write_text(text)
        copies.append(str(copy))
    assert len(copies) == 2
    result = subprocess.run(
        [analyze, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result
