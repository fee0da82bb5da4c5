"""The aiecs virtualenv of the real-agent test: without a reachable package index the test is
skipped, saying why, or fails when CI requires every service."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import aiecs_venv
from tests.support.workers_harness import free_port


@pytest.fixture
def unreachable_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip pointed at a local port nothing listens on, with no other index or wheel folder,
    and the virtualenvs kept in the test's own folder."""
    port = free_port()
    monkeypatch.setattr(aiecs_venv, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")


@pytest.mark.usefixtures("unreachable_index")
def test_without_the_package_index_the_test_is_skipped_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SESSIONS_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip could not download aiecs"):
        aiecs_venv.aiecs_python()
    # Nothing half-built is left to be taken for a finished virtualenv.
    assert not aiecs_venv.venv_path().exists()


@pytest.mark.usefixtures("unreachable_index")
def test_without_the_package_index_ci_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONS_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="SESSIONS_REQUIRE_SERVICES=1"):
        aiecs_venv.aiecs_python()


def test_the_virtualenv_is_kept_in_the_ignored_cache_keyed_by_version() -> None:
    path = aiecs_venv.venv_path()
    assert path.parent == aiecs_venv.REPO_ROOT / ".cache"
    assert path.name.startswith(f"aiecs-{aiecs_venv.AIECS_VERSION}-")
    assert ".cache/" in (aiecs_venv.REPO_ROOT / ".gitignore").read_text().splitlines()
