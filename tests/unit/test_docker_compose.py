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
            assert command[:3] == ["celery", "-A", "sessions.worker"], f"{name}: {command}"
            assert command[3] in CELERY_SUBCOMMANDS, f"{name}: celery has no {command[3]!r}"
        checked += 1
    assert checked == 4


def test_celery_app_is_importable_as_compose_names_it() -> None:
    from celery.app.utils import find_app

    app = find_app("sessions.worker")  # what `celery -A sessions.worker worker` finds
    app.loader.import_default_modules()  # and imports
    assert {"sessions.ingest", "sessions.expire_idle"} <= set(app.tasks)


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


#: Services that run once and exit (no restart policy, no health check).
ONE_SHOT = {"migrate"}
#: Restart policies under which Docker starts a service again when its process exits.
RESTARTING = {"always", "unless-stopped", "on-failure"}


def _health_command(service: dict[str, Any]) -> list[str]:
    """The health check's command as the container's shell would run it (``$$`` is compose's
    escape for a ``$`` it must not substitute itself)."""
    test = service["healthcheck"]["test"]
    kind, *words = test
    if kind == "CMD-SHELL":
        (line,) = words
        return shlex.split(line.replace("$$", "$"))
    assert kind == "CMD", test
    return [word.replace("$$", "$") for word in words]


def test_every_long_running_service_is_restarted_when_it_exits(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} runs once; it must not be restarted"
        else:
            assert service.get("restart") in RESTARTING, f"{name}: no restart policy"


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in ONE_SHOT:
            continue
        assert "healthcheck" in service, f"{name}: no health check"
        assert _health_command(service), f"{name}: an empty health check"
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_no_health_check_leaves_a_dollar_to_compose(compose: dict[str, Any]) -> None:
    """A lone ``$`` is substituted by compose from the host's environment (to nothing): the
    container's ``$HOSTNAME`` must be written ``$$HOSTNAME``."""
    for name, service in compose["services"].items():
        for word in service.get("healthcheck", {}).get("test", []):
            assert not re.search(r"(?<!\$)\$(?!\$)", word.replace("$$", "")), (name, word)


@pytest.mark.parametrize(
    ("service", "node"),
    [("worker", "celery@$HOSTNAME"), ("beat", "celerybeat@$HOSTNAME")],
)
def test_worker_and_beat_are_checked_by_a_celery_ping_to_their_own_node(
    compose: dict[str, Any], service: str, node: str
) -> None:
    from celery.beat import beat_nodename
    from celery.bin.celery import celery
    from celery.utils.nodenames import default_nodename
    from celery.worker.control import Panel

    command = _health_command(compose["services"][service])
    assert command[:5] == ["celery", "-A", "sessions.worker", "inspect", "ping"], command
    assert Panel.meta["ping"].type == "inspect"
    options = {opt for param in celery.commands["inspect"].params for opt in param.opts}
    assert {word for word in command[5:] if word.startswith("-")} <= options, command
    assert command[command.index("--destination") + 1] == node
    # The node answers under Celery's default name for this host (neither command sets -n).
    started = _command(compose["services"][service])
    assert not {"-n", "--hostname"} & set(started), started
    default = default_nodename(None) if service == "worker" else beat_nodename()
    assert node.replace("$HOSTNAME", default.split("@", 1)[1]) == default


def test_beat_answers_pings(compose: dict[str, Any]) -> None:
    from celery.bin.celery import celery

    command = _command(compose["services"]["beat"])
    assert "--enable-remote-control" in command
    options = {opt for param in celery.commands["beat"].params for opt in param.opts}
    assert "--enable-remote-control" in options
