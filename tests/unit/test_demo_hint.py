"""The demo's closing hint names a ``sessions`` command the user's shell can run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from sessions import demo

BESIDE = Path(sys.executable).parent / "sessions"

pytestmark = pytest.mark.skipif(
    not BESIDE.exists(), reason=f"no sessions script beside {sys.executable} (not installed)"
)


def test_the_hint_gives_the_path_when_path_does_not_find_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    assert demo._sessions_command() == shlex.quote(str(BESIDE))


def test_the_hint_gives_the_path_when_path_finds_another_installation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "sessions"
    other.touch()
    monkeypatch.setattr(demo.shutil, "which", lambda name: str(other))
    assert demo._sessions_command() == shlex.quote(str(BESIDE))


def test_the_hint_gives_the_name_when_path_finds_this_installation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo.shutil, "which", lambda name: str(BESIDE))
    assert demo._sessions_command() == "sessions"


def test_a_path_with_a_space_is_quoted_for_the_shell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "my venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "sessions").touch()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    assert shlex.split(demo._sessions_command()) == [str(bin_dir / "sessions")]
