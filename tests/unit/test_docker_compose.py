"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong in it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from sessions.cli import app as cli_app
from sessions.settings import Settings

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
CELERY_SUBCOMMANDS = {"worker", "beat", "flower"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def test_has_the_production_services(compose: dict[str, Any]) -> None:
    assert {"redis", "postgres", "migrate", "worker", "beat", "flower"} <= set(compose["services"])


def test_project_commands_name_real_entry_points(compose: dict[str, Any]) -> None:
    # typer vendors its own click, so commands are found by their ``commands`` mapping.
    cli: Any = typer.main.get_command(cli_app)
    checked = 0
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        command = _command(service)
        if command[0] == "sessions":
            group = cli
            for word in command[1:]:
                if word.startswith("-"):
                    break
                assert hasattr(group, "commands"), f"{name}: {word!r} after a leaf command"
                assert word in group.commands, f"{name}: `sessions` has no command {word!r}"
                group = group.commands[word]
        else:
            assert command[:3] == ["celery", "-A", "workers"], f"{name}: unknown command {command}"
            assert command[3] in CELERY_SUBCOMMANDS, f"{name}: celery has no {command[3]!r}"
        checked += 1
    assert checked == 4


def test_celery_app_is_importable_as_compose_names_it() -> None:
    import workers

    workers.app.loader.import_default_modules()  # what `celery -A workers worker` does
    assert {"sessions.ingest", "sessions.expire_idle"} <= set(workers.app.tasks)


def test_every_sessions_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = {f"SESSIONS_{field.upper()}" for field in Settings.model_fields}
    seen: set[str] = set()
    for service in compose["services"].values():
        environment = service.get("environment", {})
        seen |= {key for key in environment if key.startswith("SESSIONS_")}
    assert seen, "no service is configured through SESSIONS_* variables"
    assert seen <= known, f"unknown settings: {sorted(seen - known)}"


def test_workers_reach_the_services_by_their_compose_names(compose: dict[str, Any]) -> None:
    environment = compose["services"]["worker"]["environment"]
    assert re.match(r"redis://redis:6379", environment["SESSIONS_BROKER_URL"])
    assert "@postgres:5432/" in environment["SESSIONS_DATABASE_URL"]
    Settings(
        database_url=environment["SESSIONS_DATABASE_URL"],
        broker_url=environment["SESSIONS_BROKER_URL"],
    )


def test_the_workers_metrics_port_is_published_on_the_hosts_loopback_only(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    settings = Settings(
        **{
            key.removeprefix("SESSIONS_").lower(): value
            for key, value in worker["environment"].items()
            if key.startswith("SESSIONS_METRICS_")
        }
    )
    assert settings.metrics_port != 0
    # Inside the container the endpoint must not bind loopback, or the published port is dead.
    assert settings.metrics_host == "0.0.0.0"
    assert f"127.0.0.1:{settings.metrics_port}:{settings.metrics_port}" in worker["ports"]
