"""The ``sessions`` console script names the extra a command needs (sessions/command.py)."""

from __future__ import annotations

import sys

import pytest

import sessions.cli
from sessions.command import main


@pytest.mark.parametrize("command", ["worker", "beat", "demo"])
def test_a_command_that_starts_celery_names_the_worker_extra_without_it(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery is in the ``worker`` extra only (an agent's install has no Celery): without it,
    ``sessions worker`` (``beat``, ``demo``) says so in one line, instead of a traceback from
    ``python -m celery`` or a demo waiting for a worker that could not start."""
    seen: list[str] = []
    monkeypatch.setattr(sessions.cli, "find_spec", lambda name: seen.append(name))
    monkeypatch.setattr(sessions.cli.os, "execv", lambda *_: pytest.fail("celery was started"))
    monkeypatch.setattr("sessions.demo.run_demo", lambda _: pytest.fail("the demo was started"))
    monkeypatch.setattr(sys, "argv", ["sessions", command])
    with pytest.raises(SystemExit) as exited:
        main()
    assert seen == ["celery"]
    assert str(exited.value.code) == (
        "Error: this command needs the 'worker' extra (celery is not installed):"
        " pip install '.[worker]' in agent-sessions' checkout (README, Installing)"
    )
