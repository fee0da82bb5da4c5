"""Engines and schema upgrades: the one place that knows how each backend is opened.

SQLite, the embedded default, is shared by a worker, beat and the CLI at once, so every
connection runs in WAL mode with a busy timeout, and write transactions take the write
lock up front (``BEGIN IMMEDIATE``) instead of failing with ``database is locked`` when a
reader tries to become a writer.

A *read-only* engine (the dashboard's) refuses every write in the database itself: SQLite
connections run with ``PRAGMA query_only`` and begin plain deferred transactions (a reader
must not take the write lock), PostgreSQL sessions start with
``default_transaction_read_only``.

Only PostgreSQL and SQLite are supported (the ledger and the counters are written with
their ``ON CONFLICT`` upserts): an engine for anything else is refused with a clear error
instead of failing on the first write.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Connection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from sessions import deep_json
from sessions.errors import (
    SchemaNotAtHeadError,
    StoreUnavailableError,
    StoreUnusableError,
    UnsupportedDatabaseError,
    first_line,
)
from sessions.settings import mask_url
from sessions.tables import LatencyHistogram, UTCDateTime

#: Seconds a SQLite connection waits for another process's write lock.
SQLITE_BUSY_TIMEOUT = 30.0
#: Execution option of a connection that only reads: on SQLite it begins a plain deferred
#: transaction instead of taking the write lock up front.
READ_ONLY_OPTION = "sessions_read_only"
#: The Alembic scripts: a directory of the package, wherever it is installed (pip unpacks a
#: wheel onto the file system, which Alembic needs to read them).
MIGRATIONS_DIR = Path(str(files("sessions") / "migrations"))
#: The newest revisions of :data:`MIGRATIONS_DIR`, known without Alembic, so that a worker or
#: beat starting on a database already at them never imports it: Alembic and the scripts it
#: reads stay resident in a worker's main process, and in the pages its pool processes
#: share, some 7 MB (bench/worker_memory.py). tests/unit/test_worker_imports.py keeps this
#: equal to Alembic's own heads.
HEAD_REVISIONS = frozenset({"0009"})
#: Alembic's table of the revisions a database is at (its default name, as env.py leaves it).
VERSION_TABLE = "alembic_version"
#: Backends the store is written for (SQLAlchemy backend names).
SUPPORTED_BACKENDS = ("postgresql", "sqlite")


def parse_url(url: str) -> URL:
    """``url`` as SQLAlchemy reads it.

    Raises :class:`UnsupportedDatabaseError` naming ``SESSIONS_DATABASE_URL`` (not its value)
    for a text SQLAlchemy cannot read, such as a port that is not a number; its own error
    would print the URL whole, password included.
    """
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise UnsupportedDatabaseError(
            "SESSIONS_DATABASE_URL is not a database URL SQLAlchemy can read (not shown: what "
            "cannot be read cannot be masked either); the form is "
            "dialect+driver://user:password@host:port/database, the port a number"
        ) from None


def check_supported(url: str) -> None:
    """Refuse a URL naming a database the store is not written for.

    Raises :class:`UnsupportedDatabaseError` naming the (masked) URL and its backend, or
    saying that its password holds an ``@`` that is not percent-encoded, or that it cannot be
    read at all (:func:`parse_url`).
    """
    parsed = parse_url(url)
    if parsed.host is not None and "@" in parsed.host:
        # SQLAlchemy ends the password at its first '@' and takes the rest for the host: the
        # driver would fail to resolve it and print it, a piece of the password, in its error.
        raise UnsupportedDatabaseError(
            f"the database URL {mask_url(url)} has an '@' in its password (or user name) "
            "that is not percent-encoded: write it as %40"
        )
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise UnsupportedDatabaseError(
            f"the database at {mask_url(url)} is {backend}, which the store does not support: "
            "use PostgreSQL (postgresql+psycopg://...) or SQLite (sqlite:///...)"
        )


def missing_sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, if it does not exist (``None`` for other databases).

    Connecting would create it, empty: a reader that only looks should not leave one behind.
    Raises what :func:`parse_url` raises.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def create_store_engine(url: str, *, read_only: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the backend's connection rules applied.

    With ``read_only`` the database refuses writes on every connection of the engine, so
    a bug in a reader (or an injected statement) cannot change data. Raises
    :class:`UnsupportedDatabaseError` for a backend other than PostgreSQL and SQLite.
    """
    check_supported(url)
    # Every read of a JSON column answers, however deep the stored document (deep_json).
    kwargs.setdefault("json_deserializer", deep_json.loads)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, read_only=read_only, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    if read_only and parsed.get_backend_name() == "postgresql":
        # A startup option, not a SET on connect: a SET inside the pool's first transaction
        # would be rolled back with it.
        connect_args = dict(kwargs.pop("connect_args", {}))
        options = connect_args.get("options", "")
        connect_args["options"] = f"{options} -c default_transaction_read_only=on".strip()
        kwargs["connect_args"] = connect_args
    return create_engine(url, **kwargs)


def _create_sqlite_engine(url: str, *, read_only: bool = False, **kwargs: Any) -> Engine:
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT)
    # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
    connect_args["isolation_level"] = None
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function(
            "sessions_add_seconds", 2, _sqlite_add_seconds, deterministic=True
        )
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        reading = read_only or connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


def _sqlite_add_seconds(value: str | None, seconds: float | None) -> str | None:
    """``add_seconds`` for SQLite, whose timestamps are text in SQLAlchemy's storage format."""
    if value is None or seconds is None:
        return None
    moment = datetime.fromisoformat(value) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


class add_seconds(FunctionElement[datetime]):
    """``timestamp + seconds`` in SQL, on every backend."""

    type = UTCDateTime()
    inherit_cache = True
    name = "add_seconds"


class minute_of(FunctionElement[datetime]):
    """A timestamp rounded down to the start of its minute (UTC), on every backend."""

    type = UTCDateTime()
    inherit_cache = True
    name = "minute_of"


class planned_as_likely(FunctionElement[bool]):
    """A condition that SQLite's planner is told is probably true (``likely(condition)``),
    unchanged on PostgreSQL: the same rows either way.

    Without statistics (the store never runs ``ANALYZE``) SQLite takes an equality on an
    index's first column for a few rows, so for ``status = 'active' AND error_rate_bound > n``
    it reads every active session through ``(status, last_activity_minute)`` rather than the
    few of the partial index on ``error_rate_bound``. Marked likely, the equality no longer
    looks selective and the partial index, whose condition it still implies, is chosen
    (README, Performance, "Dashboard page load").
    """

    type = Boolean()
    inherit_cache = True
    name = "planned_as_likely"
    #: A condition already: no ``= 1`` after it where booleans are integers (SQLite), which
    #: would hide the condition from the planner.
    _is_implicitly_boolean = True


class latency_add(FunctionElement[dict[int, int]]):
    """``latency_add(histogram, delta)``: two ``latency`` values (``LatencyHistogram``) merged,
    bucket by bucket; either may be NULL (no samples). PostgreSQL calls revision 0008's
    ``session_latency_add``, which loops over the delta's pairs only; SQLite merges its JSON
    objects with ``json_patch``, each bucket of the delta added to the histogram's count."""

    type = LatencyHistogram()
    inherit_cache = True
    name = "latency_add"


class latency_buckets(FunctionElement[Any]):
    """The buckets of one ``latency`` value as rows ``(key, value)``: ``key`` the bucket (an
    integer on PostgreSQL, its text on SQLite, so cast it), ``value`` its count. None for
    NULL. Use as ``latency_buckets(column).table_valued("key", "value")`` in a ``FROM`` after
    the column's table: a function there may name its columns (LATERAL on PostgreSQL,
    ``json_each``'s shape on SQLite)."""

    inherit_cache = True
    name = "latency_buckets"


def _compile_as(function: type[FunctionElement[Any]], dialect: str, template: str) -> None:
    """Compile ``function`` for ``dialect`` as ``template`` filled with its SQL arguments."""

    @compiles(function, dialect)
    def _compile(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
        return template.format(*(compiler.process(clause, **kw) for clause in element.clauses))


_compile_as(add_seconds, "postgresql", "({} + make_interval(secs => {}))")
_compile_as(add_seconds, "sqlite", "sessions_add_seconds({}, {})")
_compile_as(minute_of, "postgresql", "date_trunc('minute', {}, 'UTC')")
# SQLite keeps times as text in UTCDateTime's format: the result compares and reads as one.
_compile_as(minute_of, "sqlite", "strftime('%Y-%m-%d %H:%M:00.000000', {})")
_compile_as(planned_as_likely, "postgresql", "({0})")
_compile_as(planned_as_likely, "sqlite", "likely({0})")
_compile_as(latency_add, "postgresql", "session_latency_add({0}, CAST({1} AS BIGINT[]))")
_compile_as(
    latency_add,
    "sqlite",
    "CASE WHEN {1} IS NULL THEN {0} ELSE json_patch(coalesce({0}, json_object()),"
    " (SELECT json_group_object(d.key, coalesce(json_extract({0}, '$.\"' || d.key || '\"'), 0)"
    " + d.value) FROM json_each({1}) AS d)) END",
)
_compile_as(latency_buckets, "postgresql", "session_latency_buckets({0})")
_compile_as(latency_buckets, "sqlite", "json_each({0})")


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_schema(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations to ``url`` (idempotent; safe at every start).

    Raises :class:`StoreUnavailableError` when a PostgreSQL server cannot be reached (or
    is lost during the upgrade): waiting may help. A database that answers but fails the
    upgrade raises what failed (an SQLAlchemy or Alembic error), and one the store does
    not support :class:`UnsupportedDatabaseError`.
    """
    from alembic import command

    reach(url)
    try:
        command.upgrade(_alembic_config(url), revision)
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailableError(
                f"lost the database at {mask_url(url)} while migrating it: {_cause(exc)}"
            ) from exc
        raise


def reach(url: str) -> None:
    """Connect to ``url`` once, to tell a database that is away from one that is wrong.

    Raises :class:`StoreUnavailableError` if a PostgreSQL server does not accept a
    connection (down, restarting, unreachable, refusing these credentials), and
    :class:`StoreUnusableError` if a SQLite file cannot be opened: there is no server to
    wait for.
    """
    engine = create_store_engine(url, poolclass=NullPool)
    try:
        with _connect(engine, url):
            pass
    finally:
        engine.dispose()


def _connect(engine: Engine, url: str) -> Connection:
    """``engine.connect()``, its failure raised as :func:`reach` says."""
    try:
        return engine.connect()
    except DBAPIError as exc:
        if engine.dialect.name == "sqlite":
            raise StoreUnusableError(
                f"cannot open the database at {mask_url(url)}: {_cause(exc)}"
            ) from exc
        raise StoreUnavailableError(
            f"cannot reach the database at {mask_url(url)}: {_cause(exc)}"
        ) from exc


def _cause(exc: DBAPIError) -> str:
    return first_line(exc.orig or exc)


def at_head_revisions(url: str) -> bool:
    """Whether the database at ``url`` is at :data:`HEAD_REVISIONS`, read without Alembic.

    Reads in a read-only transaction (on SQLite it takes no write lock, so a writer holding
    one does not keep a worker's start waiting). ``False`` when the connection is made but
    the answer cannot be read: the caller then goes the long way, :func:`upgrade_schema` and
    :func:`require_head`, which say what is wrong. Raises as :func:`reach` does when no
    connection is made (so a database that is away is not asked twice).
    """
    engine = create_store_engine(url, poolclass=NullPool, read_only=True)
    try:
        with _connect(engine, url) as connection:
            if not inspect(connection).has_table(VERSION_TABLE):
                return False
            rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
            return {row[0] for row in rows} == HEAD_REVISIONS
    except DBAPIError:
        return False
    finally:
        engine.dispose()


def require_head(url: str) -> str:
    """The schema's revision, if it is the newest this code knows.

    Raises :class:`SchemaNotAtHeadError` naming the database (masked URL), the revision
    it is at (``none`` for an empty database) and the newest one.
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(_alembic_config(url)).get_heads())
    engine = create_store_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            current = set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()
    if current != heads:
        raise SchemaNotAtHeadError(
            f"the schema of the database at {mask_url(url)} is at revision "
            f"{', '.join(sorted(current)) or 'none'}, not at the newest, "
            f"{', '.join(sorted(heads))}"
        )
    return ", ".join(sorted(current))


def upsert_into(connection: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An ``INSERT`` with ``ON CONFLICT`` support in the connection's dialect."""
    return upsert_into_table(table, connection.dialect.name)


def upsert_into_table(table: Table, dialect: str) -> postgresql.Insert | sqlite.Insert:
    """An ``INSERT`` with ``ON CONFLICT`` support in ``dialect`` (PostgreSQL or SQLite)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
