"""A virtualenv with aiecs, for the test that runs a real AIECS agent on this project.

aiecs is large (with this project's dependencies some 115 packages, 700 MB) and never a
dependency of this project, so it gets a virtualenv of its own under the repository's ignored
``.cache/``, built once and reused while its key stays the same: the aiecs version, this
project's runtime dependencies (which it installs beside aiecs; the project itself is imported
from the working tree) and the Python version. A build in progress elsewhere (another test
process) is waited for, behind a file lock; a build cut short is begun again, since only a
finished one is marked complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tests.support.services import missing_service

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The aiecs release the test runs against.
AIECS_VERSION = "2.2.0"
#: Where the virtualenvs are kept (ignored by git).
CACHE = REPO_ROOT / ".cache"
#: Longest one pip command may run (a hang guard: a cold install takes minutes).
PIP_TIMEOUT = 1800


#: The project's extras the agent needs beside its base (the client): ``ContextEngine``'s reads
#: open the store and migrate an empty database.
EXTRAS = ("store",)


def _requirements() -> list[str]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    name, extras = project["name"], project["optional-dependencies"]
    dependencies: list[str] = list(project["dependencies"])
    wanted, seen = list(EXTRAS), set()
    while wanted:  # an extra may name others of this project: ``agent-sessions[store]``
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in extras[extra]:
            if requirement.startswith(f"{name}["):
                wanted.extend(requirement[len(name) + 1 : -1].split(","))
            else:
                dependencies.append(requirement)
    return [f"aiecs=={AIECS_VERSION}", *dependencies]


def venv_path() -> Path:
    """Where the virtualenv for the current requirements and Python lives."""
    key = "\n".join([*_requirements(), sys.version.split()[0]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return CACHE / f"aiecs-{AIECS_VERSION}-{digest}"


def _pip(python: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *arguments],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )


def _last_lines(result: subprocess.CompletedProcess[str], lines: int = 5) -> str:
    text = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return "\n".join(text[-lines:])


def aiecs_python() -> Path:
    """The Python of a virtualenv with aiecs and this project's dependencies, built if need be.

    Skips the test (fails, with ``SESSIONS_REQUIRE_SERVICES=1``) when the package index cannot
    be reached; any other failure to install is a failure.
    """
    venv = venv_path()
    python = venv / "bin" / "python"
    complete = venv / ".complete"
    CACHE.mkdir(exist_ok=True)
    with (CACHE / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        began = time.monotonic()
        # Whether the index answers, asked with this interpreter's pip before anything is built.
        with tempfile.TemporaryDirectory() as probe:
            reached = _pip(
                Path(sys.executable), "download", "--no-deps", "--dest", probe, _requirements()[0]
            )
        if reached.returncode != 0:
            missing_service(
                f"cannot build the aiecs {AIECS_VERSION} virtualenv: pip could not download "
                f"aiecs from the package index (no network?):\n{_last_lines(reached)}"
            )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        installed = _pip(python, "install", "--quiet", *_requirements())
        if installed.returncode != 0:
            raise AssertionError(
                f"pip could not install aiecs {AIECS_VERSION} with this project's dependencies "
                f"into {venv}:\n{_last_lines(installed, 30)}"
            )
        complete.write_text(f"built in {time.monotonic() - began:.0f} s\n")
    return python
