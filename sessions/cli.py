"""The ``sessions`` command: run workers and beat, migrate, and read sessions from a shell.

Read commands talk to the database directly (no broker needed). Every command that cannot
reach a service exits non-zero with the service's URL, password masked. Every error is one
line, ``Error: ...``, click's: an option out of bounds names the option and its rule, exit
status 2 (a usage error); the bounds are the store's own (:mod:`sessions.bounds`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib.util import find_spec
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from alembic.util import CommandError
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from sessions.bounds import (
    MAX_DAYS,
    MAX_PAGE_SIZE,
    REFUSED_ARGUMENTS,
    ArgumentError,
    check_days,
    check_id,
    check_moment,
    check_seconds,
)
from sessions.database import (
    at_head_revisions,
    check_supported,
    missing_sqlite_file,
    require_head,
)
from sessions.errors import (
    StoreUnavailableError,
    StoreUnusableError,
    UnsupportedDatabaseError,
)
from sessions.histogram import LOWEST
from sessions.records import Aggregate, SessionRecord, Status
from sessions.settings import Settings, describe_settings_error, get_settings, mask_url
from sessions.store import SessionStore

T = TypeVar("T")

app = typer.Typer(
    help="Session metrics for AI agents: workers, beat, migrations and read-only reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's own rendering: an error is one ``Error: ...`` line (typer's rich panel wraps it
    # over several), after the usage line for a usage error.
    rich_markup_mode=None,
)


@app.callback()
def _check_settings() -> None:
    """Read the ``SESSIONS_*`` settings once, before any command, so a bad value is one
    ``Error:`` line naming the variable (exit status 2), not a traceback from deep inside."""
    try:
        get_settings()
    except ValidationError as error:
        fail(describe_settings_error(error))


db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
#: Wider than any table of these commands can be (eight columns of ids up to 255 characters).
UNBOUNDED_WIDTH = 10_000


def _print_table(table: Table) -> None:
    """Print ``table`` fitted to the terminal, or, into a pipe or a file (and unless
    ``COLUMNS`` says otherwise), as wide as its values make it: rich would fit it to 80
    columns there and fold or cut the values, where ``grep`` and the like expect each row
    whole on one line (``--json`` is still the form for scripts)."""
    if console.is_terminal or "COLUMNS" in os.environ:
        console.print(table)
        return
    needed = console.measure(table, options=console.options.update_width(UNBOUNDED_WIDTH))
    fitted = console.width
    console.width = max(fitted, needed.maximum)
    try:
        console.print(table)
    finally:
        console.width = fitted


#: The queues a ``sessions worker`` consumes unless told otherwise.
ALL_QUEUES = "sessions.events,sessions.maintenance"
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
#: Most users, sessions and requests per session ``sessions demo`` simulates.
DEMO_MAX = 10_000
#: A duration ago as ``--since`` / ``--until`` take it: ``90s``, ``15m``, ``2h``, ``7d``, ``1h30m``.
DURATION = re.compile(
    r"(?:(?P<days>\d+)d)?(?:(?P<hours>\d+)h)?(?:(?P<minutes>\d+)m)?(?:(?P<seconds>\d+)s)?"
)


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """A moment given as an ISO 8601 time (UTC unless it names another offset) or as a
    duration before ``now`` (``90s``, ``15m``, ``2h``, ``7d``, ``1h30m``).

    Raises ``ValueError`` saying which forms are accepted.
    """
    duration = DURATION.fullmatch(text.strip())
    if duration is not None and any(duration.groupdict().values()):
        parts = {unit: int(value or 0) for unit, value in duration.groupdict().items()}
        try:
            return (now or datetime.now(UTC)) - timedelta(**parts)
        except OverflowError:  # a moment before the year 1: far out of check_moment's bounds
            raise ValueError(f"{text!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2024-05-01T12:00:00Z) "
            "nor a duration ago (90s, 15m, 2h, 7d, 1h30m)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _option(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as a typer parser: its ``ValueError`` becomes click's ``BadParameter``, which
    names the option (``Invalid value for '--idle': must be ...``)."""

    def parser(text: str) -> T:
        try:
            return parse(text)
        except ArgumentError as exc:
            raise typer.BadParameter(exc.problem) from None
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parser


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


#: ``--since`` / ``--until``: :func:`parse_moment`, within the store's bounds for a moment.
_moment_option = _option(lambda text: check_moment("moment", parse_moment(text)))
#: A session or user id, by the event model's rule (1-255 printable ASCII characters).
_id_option = _option(lambda text: check_id("id", text))


#: How ``--since`` / ``--until`` say what they take.
MOMENT_HELP = "an ISO 8601 time (UTC unless it says otherwise) or a duration ago: 90s, 15m, 2h, 7d"


def fail(message: str, code: int = 2) -> NoReturn:
    """Stop with ``Error: message`` on one line, as click shows its own errors, and exit
    status ``code``."""
    typer.echo(f"Error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


@contextmanager
def open_store(settings: Settings | None = None, *, create: bool = False) -> Iterator[SessionStore]:
    """A store for one command; unreachable or unmigrated databases become clear errors.

    A SQLite file that does not exist is one too, unless the command is to ``create`` it
    (``db upgrade``, ``worker``, ``beat``): connecting would leave an empty file behind, and a
    mistyped path would look like an empty fleet.
    """
    settings = settings or get_settings()
    url = mask_url(settings.database_url)
    try:
        missing = missing_sqlite_file(settings.database_url)
    except StoreUnusableError as exc:  # a URL that cannot be read at all
        fail(str(exc))
    if missing is not None and not create:
        fail(
            f"there is no database at {url} (no file {missing}): run `sessions db upgrade` "
            "to create it, or start a worker, which does"
        )
    try:
        store = SessionStore(settings.database_url, settings=settings)
    except StoreUnusableError as exc:  # a database the store does not support
        fail(str(exc))
    try:
        yield store
    except (StoreUnavailableError, StoreUnusableError) as exc:
        fail(str(exc))
    except CommandError as exc:  # Alembic's: e.g. a revision this code does not know
        fail(f"cannot migrate the database at {url}: {exc}")
    except OperationalError as exc:
        if "no such table" in str(exc.orig):
            fail(f"the database at {url} has no schema yet: run `sessions db upgrade`")
        fail(f"cannot reach the database at {url}: {exc.orig}".strip())
    except ProgrammingError as exc:
        if "does not exist" in str(exc.orig):
            fail(f"the database at {url} has no schema yet: run `sessions db upgrade`")
        fail(f"the database at {url} refused the command: {exc.orig}")
    except DBAPIError as exc:  # e.g. SQLite's "file is not a database"
        fail(f"cannot open the database at {url}: {exc.orig}")
    except REFUSED_ARGUMENTS as exc:  # the options are checked first: this is a safety net
        fail(str(exc))
    finally:
        store.dispose()


def _require_celery() -> None:
    """Raise :class:`ModuleNotFoundError` for ``celery`` unless it is installed: a command that
    starts Celery processes (``worker``, ``beat``, ``demo``) then says, as a missing import
    does (sessions/command.py), that it needs the ``worker`` extra, instead of a child
    process failing to start."""
    if find_spec("celery") is None:
        raise ModuleNotFoundError("No module named 'celery'", name="celery")


def _exec_celery(arguments: list[str]) -> NoReturn:
    """Replace this process with ``celery -A sessions.worker <arguments>``, the README's command.

    Nothing is asked of the servers first, so that this behaves as the plain command does: a
    worker or beat started while the database or the broker is down waits for it (no
    supervisor needed), and one pointed at a database it cannot use refuses at start with
    exit status 78 (``EX_CONFIG``). Only a URL naming a database the store does not support
    is refused here already, before any connection, with the same status.
    """
    _require_celery()
    settings = get_settings()
    try:
        check_supported(settings.database_url)
    except UnsupportedDatabaseError as exc:
        fail(str(exc), code=os.EX_CONFIG)
    command = [sys.executable, "-m", "celery", "-A", "sessions.worker", *arguments]
    sys.stdout.flush()
    os.execv(sys.executable, command)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Queues to consume.")] = ALL_QUEUES,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Run a Celery worker (`celery -A sessions.worker worker`); extra options go to Celery."""
    _exec_celery(["worker", "-Q", queues, "--loglevel", loglevel, *ctx.args])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(
    ctx: typer.Context,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Run Celery beat (`celery -A sessions.worker beat`) with the housekeeping schedule."""
    _exec_celery(["beat", "--loglevel", loglevel, *ctx.args])


@app.command()
def demo(
    users: Annotated[int, typer.Option(min=1, max=DEMO_MAX, help="Simulated users.")] = 20,
    sessions: Annotated[int, typer.Option(min=1, max=DEMO_MAX, help="Simulated sessions.")] = 60,
    requests: Annotated[
        int, typer.Option(min=1, max=DEMO_MAX, help="Requests per healthy session.")
    ] = 40,
) -> None:
    """Run the pipeline end to end: worker, beat and a simulated fleet of agents."""
    _require_celery()
    from sessions.demo import DemoConfig, run_demo

    code = run_demo(DemoConfig(users=users, sessions=sessions, requests_per_session=requests))
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations (safe to run at every deploy)."""
    settings = get_settings()
    with open_store(settings, create=True) as store:
        already = at_head_revisions(store.url)
        store.upgrade()
        revision = require_head(store.url)
    done = "was already at" if already else "migrated to"
    console.print(f"database at {mask_url(settings.database_url)} {done} revision {revision}")


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _sessions_table(
    records: list[SessionRecord],
    title: str,
    level: Callable[[SessionRecord], str] | None = None,
) -> Table:
    table = Table(title=title)
    # Ids fold where a terminal's width runs out, never cut short with an ellipsis: an id
    # that loses its end is another id.
    for name in ("session", "user"):
        table.add_column(name, overflow="fold")
    table.add_column("status")
    for name in ("requests", "errors", "error rate", "avg time"):
        table.add_column(name, justify="right")
    table.add_column("last activity")
    if level is not None:
        table.add_column("level")
    for r in records:
        table.add_row(
            r.session_id,
            r.user_id or "-",
            r.status if r.end_reason is None else f"{r.status} ({r.end_reason})",
            str(r.request_count),
            str(r.error_count),
            f"{r.error_rate:.0%}",
            f"{r.average_processing_time:.3f}s",
            r.last_activity.strftime("%Y-%m-%d %H:%M:%S"),
            *([] if level is None else [level(r)]),
        )
    return table


UserOption = Annotated[
    str | None, typer.Option("--user", parser=_id_option, help="Only this user's sessions.")
]


@app.command("list")
def list_sessions(
    user: UserOption = None,
    status: Annotated[Status | None, typer.Option("--status")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE_SIZE)] = 50,
    after: Annotated[
        str | None, typer.Option(parser=_id_option, help="Start after this session id.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List sessions by id, a page at a time."""
    with open_store() as store:
        records = store.list_sessions(user_id=user, status=status, limit=limit, after=after)
    if as_json:
        _print_json([r.model_dump(mode="json") for r in records])
    else:
        _print_table(_sessions_table(records, f"{len(records)} sessions"))


@app.command()
def show(
    session_id: Annotated[str, typer.Argument(parser=_id_option)], as_json: JsonFlag = False
) -> None:
    """Show one session with every field."""
    with open_store() as store:
        record = store.get(session_id)
    if record is None:
        fail(f"no session {session_id!r}", code=1)
    if as_json:
        _print_json(record.model_dump(mode="json"))
        return
    table = Table(title=f"session {session_id}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in record.model_dump().items():
        table.add_row(key, "-" if value is None else str(value))
    _print_table(table)


def _percentile(seconds: float | None) -> str:
    """A percentile estimate as the table shows it: ``-`` without requests."""
    if seconds is None:
        return "-"
    return f"< {LOWEST:.3f}s" if seconds < LOWEST else f"{seconds:.3f}s"


def _aggregate_table(title: str, aggregate: Aggregate) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = {
        "sessions": aggregate.sessions,
        "requests": aggregate.request_count,
        "errors": aggregate.error_count,
        "error rate": f"{aggregate.error_rate:.1%}",
        "total processing time": f"{aggregate.total_processing_time:.3f}s",
        "average processing time": f"{aggregate.average_processing_time:.3f}s",
        "p50 processing time": _percentile(aggregate.processing_time_p50),
        "p95 processing time": _percentile(aggregate.processing_time_p95),
        "p99 processing time": _percentile(aggregate.processing_time_p99),
        "input tokens": aggregate.input_tokens,
        "output tokens": aggregate.output_tokens,
        "cost": f"{aggregate.cost:.4f}",
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def _stats_title(
    user: str | None, status: str | None, since: datetime | None, until: datetime | None
) -> str:
    """What the table covers, e.g. ``completed sessions of u-1, last active since .. UTC``."""
    title = f"{status or 'all'} sessions" + (f" of {user}" if user else "")
    bounds = [
        f"{word} {moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
        for word, moment in (("since", since), ("before", until))
        if moment is not None
    ]
    return title + (f", last active {' and '.join(bounds)} UTC" if bounds else "")


@app.command()
def stats(
    user: UserOption = None,
    status: Annotated[Status | None, typer.Option("--status")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            parser=_moment_option, metavar="WHEN", help=f"Last active at or after {MOMENT_HELP}."
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            parser=_moment_option, metavar="WHEN", help=f"Last active before {MOMENT_HELP}."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Requests, errors, tokens, cost and p50/p95/p99 processing time over sessions (their
    current runs), computed by the database; --since/--until select by last activity."""
    if since is not None and until is not None and since >= until:
        raise typer.BadParameter(
            f"must be before --until ({since.isoformat()} is not before {until.isoformat()})",
            param_hint="'--since'",
        )
    with open_store() as store:
        aggregate = store.aggregate(user_id=user, status=status, since=since, until=until)
    if as_json:
        _print_json(aggregate.model_dump(mode="json"))
        return
    _print_table(_aggregate_table(_stats_title(user, status, since, until), aggregate))


@app.command()
def health(as_json: JsonFlag = False) -> None:
    """Active sessions above the warn error rate; those above the fail rate are marked."""
    settings = get_settings()
    with open_store(settings) as store:
        records = store.unhealthy()
    if as_json:
        _print_json([r.model_dump(mode="json") for r in records])
        return
    if not records:
        console.print(f"no active session above {settings.health_warn_rate:.0%} errors")
        return
    fail_rate = settings.health_fail_rate
    _print_table(
        _sessions_table(
            records,
            "unhealthy active sessions",
            level=lambda r: "FAIL" if r.error_rate > fail_rate else "warn",
        )
    )


@app.command()
def cleanup(
    idle: Annotated[
        float | None,
        typer.Option(
            "--idle",
            parser=_option(lambda text: check_seconds("idle", _number(text))),
            metavar="SECONDS",
            help="Expire sessions idle this many seconds (above 0, at most 100 years).",
        ),
    ] = None,
    age: Annotated[
        float | None,
        typer.Option(
            "--age",
            parser=_option(lambda text: check_days("age", _number(text))),
            metavar="DAYS",
            help=f"Expire sessions older than this many days (above 0, at most {MAX_DAYS}).",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, change nothing.")] = False,
) -> None:
    """Expire idle or old sessions now (beat does this on its schedule)."""
    settings = get_settings()
    sweeps: list[tuple[str, Callable[[SessionStore], Any]]] = []
    if idle is not None or age is None:
        seconds = settings.max_idle_seconds if idle is None else idle
        sweeps.append((f"idle > {seconds:g}s", lambda s: s.expire_idle(seconds, dry_run=dry_run)))
    if age is not None:
        sweeps.append(
            (
                f"older than {age:g} days",
                lambda s: s.expire_older_than(timedelta(days=age), dry_run=dry_run),
            )
        )
    verb = "would expire" if dry_run else "expired"
    with open_store(settings) as store:
        for label, sweep in sweeps:
            result = sweep(store)
            console.print(f"{verb} {result.count} sessions ({label})")


@app.command()
def dashboard(
    host: Annotated[str | None, typer.Option(help="Address (SESSIONS_DASHBOARD_HOST).")] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port (SESSIONS_DASHBOARD_PORT); 0 = any free port."),
    ] = None,
) -> None:
    """Serve the read-only dashboard page (README: Dashboard); its log names the address."""
    from sessions.dashboard.server import DashboardConfigError, serve

    with open_store() as store:
        store.count_active()  # an unreachable or unmigrated database fails here, clearly
    try:
        serve(get_settings(), host=host, port=port)
    except DashboardConfigError as exc:
        fail(str(exc))


@app.command()
def schema() -> None:
    """Print the wire contract: the JSON Schema of what producers send (README: Wire contract)."""
    from sessions.wire import shipped_schema_text

    sys.stdout.write(shipped_schema_text())


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
