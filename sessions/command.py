"""The ``sessions`` console script: :mod:`sessions.cli`, or the extra it needs to run.

The base install is the client an agent records with; the command's dependencies are
extras (README, "Installing"). A command run without its extra fails with one line naming
the extra to install, not with a traceback about a module.
"""

from __future__ import annotations

import sys

#: The extra of the distribution that installs each optional top-level module.
EXTRA_OF = {
    "sqlalchemy": "store",
    "psycopg": "store",
    "alembic": "cli",
    "typer": "cli",
    "click": "cli",
    "rich": "cli",
    "celery": "worker",
    "prometheus_client": "worker",
    "starlette": "dashboard",
    "jinja2": "dashboard",
    "uvicorn": "dashboard",
}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra whose module ``error`` did not find; ``None`` for a module of no extra."""
    return EXTRA_OF.get((error.name or "").partition(".")[0])


def main() -> None:
    """Run the command line; exit with status 1 and one line if an extra is not installed.

    Raises the :class:`ModuleNotFoundError` itself for a module that no extra installs.
    """
    try:
        from sessions.cli import main as run

        run()
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        sys.exit(
            f"Error: this command needs the {extra!r} extra ({exc.name} is not installed):"
            f" pip install '.[{extra}]' in agent-sessions' checkout (README, Installing)"
        )
