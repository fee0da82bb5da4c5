"""The migrated schema is exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, column, create_engine, inspect, table

from sessions.database import _alembic_config, upgrade_schema
from sessions.events import Batch, RecordEvent
from sessions.histogram import bucket_of
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import (
    ERROR_RATE_BOUND_MAX,
    SESSIONS_FILLFACTOR,
    Base,
    first_error_rate_bound,
    minute_start,
    sessions_table,
)
from tests.integration.support import latency_rows
from tests.support.services import require_postgres, temporary_postgres_database


def _compare(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, Base.metadata))


def _differences(store: SessionStore) -> list[Any]:
    with store.engine.connect() as connection:
        return _compare(connection)


def test_migrated_schema_equals_the_models(store: SessionStore) -> None:
    assert _differences(store) == []


def test_migrations_create_every_table_and_index(store: SessionStore) -> None:
    inspector = inspect(store.engine)
    tables = set(inspector.get_table_names())
    assert {
        "sessions",
        "session_runs",
        "applied_batches",
        "dead_letters",
        "activity_minutes",
    } <= tables
    indexes = {index["name"] for index in inspector.get_indexes("sessions")}
    assert {
        "ix_sessions_status_activity_minute",
        "ix_sessions_active_error_rate_bound",
        "ix_sessions_status_created_at",
        "ix_sessions_user_id_status",
    } <= indexes
    assert [i["column_names"] for i in inspector.get_indexes("applied_batches")] == [["applied_at"]]


def test_upgrade_is_idempotent(store: SessionStore) -> None:
    upgrade_schema(store.url)
    assert _differences(store) == []


def test_a_difference_would_be_reported(store: SessionStore) -> None:
    """The comparison is not vacuous: a dropped index shows up as a difference."""
    # Inside a transaction that is rolled back: the PostgreSQL database is shared by the run.
    with store.engine.connect() as connection:
        transaction = connection.begin()
        connection.exec_driver_sql("DROP INDEX ix_sessions_user_id_status")
        differences = _compare(connection)
        transaction.rollback()
    assert [(kind, index.name) for kind, index in differences] == [
        ("add_index", "ix_sessions_user_id_status")
    ]
    assert _differences(store) == []


def test_the_health_index_is_partial_on_active_sessions(store: SessionStore) -> None:
    """Partial-index predicates escape compare_metadata; check the definition directly."""
    with store.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            definition = connection.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes"
                " WHERE indexname = 'ix_sessions_active_error_rate_bound'"
            ).scalar_one()
        else:
            definition = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'ix_sessions_active_error_rate_bound'"
            ).scalar_one()
    assert "error_rate_bound" in definition and "'active'" in definition


def test_sessions_leave_room_for_hot_updates(pg_store: SessionStore) -> None:
    store = pg_store  # fillfactor and HOT updates are PostgreSQL's
    with store.engine.connect() as connection:
        options = connection.exec_driver_sql(
            "SELECT reloptions FROM pg_class WHERE relname = 'sessions'"
        ).scalar_one()
    assert options == [f"fillfactor={SESSIONS_FILLFACTOR}"]


#: The columns of ``sessions`` this test writes, as revision 0006 has them.
_SESSIONS_AT_0006 = table(
    "sessions",
    *(
        column(name, sessions_table.c[name].type)
        for name in (
            "session_id",
            "status",
            "run",
            "created_at",
            "last_activity",
            "request_count",
            "error_count",
        )
    ),
)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database without any table, on each backend (its own, so it can be migrated)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    require_postgres()
    with temporary_postgres_database() as url:
        yield url


def test_0007_fills_the_coarse_columns_from_existing_rows(empty_database_url: str) -> None:
    """Rows written before revision 0007 get the minute of their activity and the bound of
    their error rate, as the store would have written them, and the sweeps find them."""
    database_url = empty_database_url
    upgrade_schema(database_url, "0006")
    engine = create_engine(database_url)
    rows = {  # session id: (last activity, requests, errors)
        "idle": (datetime(2026, 1, 1, 12, 34, 56, 789, tzinfo=UTC), 10, 1),
        "failing": (datetime(2026, 1, 1, 13, 0, tzinfo=UTC), 3, 3),
        "new": (datetime(2026, 1, 1, 13, 1, 59, 999999, tzinfo=UTC), 0, 0),
    }
    with engine.begin() as connection:
        for session_id, (at, requests, errors) in rows.items():
            connection.execute(
                _SESSIONS_AT_0006.insert().values(
                    session_id=session_id,
                    status="active",
                    run=1,
                    created_at=at,
                    last_activity=at,
                    request_count=requests,
                    error_count=errors,
                )
            )
    engine.dispose()
    upgrade_schema(database_url)
    store = SessionStore(database_url, settings=Settings())
    try:
        assert _differences(store) == []
        with store.engine.connect() as connection:
            found = {
                row.session_id: (row.last_activity_minute, row.error_rate_bound)
                for row in connection.execute(sessions_table.select())
            }
        assert found == {
            session_id: (
                minute_start(at),
                first_error_rate_bound(errors, requests),
            )
            for session_id, (at, requests, errors) in rows.items()
        }
        assert found["failing"][1] == ERROR_RATE_BOUND_MAX
        now = datetime(2026, 1, 1, 14, 0, tzinfo=UTC)
        assert store.expire_idle(3600, now=now, dry_run=True).changed == ("idle",)
        assert store.sweep_health(dry_run=True).changed == ("failing",)
    finally:
        store.dispose()


#: ``session_latency`` as revisions 0004 to 0007 have it.
_LATENCY_AT_0007 = table(
    "session_latency", column("session_id"), column("run"), column("bucket"), column("count")
)
#: Histogram rows of two live runs and one ended run, and one of a run no table holds.
_LATENCY_ROWS = {
    ("live", 1, 0): 3,
    ("live", 1, 57): 2,
    ("live", 1, 312): 2**40,  # past int4: the column is bigint
    ("pooled", 2, 10): 1,
    ("pooled", 1, 10): 4,
    ("pooled", 1, 11): 5,
}


def _latency_at_0007(connection: Connection) -> dict[tuple[str, int, int], int]:
    rows = connection.execute(_LATENCY_AT_0007.select()).all()
    return {(row.session_id, row.run, row.bucket): row.count for row in rows}


def test_0008_moves_each_histogram_into_its_runs_row_and_back(empty_database_url: str) -> None:
    """Every ``session_latency`` row lands in its run's ``latency`` (the live run's in
    ``sessions``, an ended run's in ``session_runs``), the reads and the next batch see it,
    and the downgrade restores the rows, bucket for bucket."""
    database_url = empty_database_url
    upgrade_schema(database_url, "0007")
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    runs = table("session_runs", *(column(c.name) for c in _SESSIONS_AT_0006.c))
    engine = create_engine(database_url)
    with engine.begin() as connection:
        for session_id, run, status in (("live", 1, "active"), ("pooled", 2, "active")):
            connection.execute(
                sessions_table.insert().values(
                    session_id=session_id,
                    status=status,
                    run=run,
                    created_at=at,
                    last_activity=at,
                    last_activity_minute=at,
                    request_count=0,
                    error_count=0,
                )
            )
        connection.execute(
            runs.insert().values(
                session_id="pooled",
                status="completed",
                run=1,
                created_at=at,
                last_activity=at,
                request_count=9,
                error_count=0,
            )
        )
        for (session_id, run, bucket), count in _LATENCY_ROWS.items():
            connection.execute(
                _LATENCY_AT_0007.insert().values(
                    session_id=session_id, run=run, bucket=bucket, count=count
                )
            )
        connection.execute(  # a run that is in no table: dropped with the table
            _LATENCY_AT_0007.insert().values(session_id="gone", run=1, bucket=5, count=1)
        )
    upgrade_schema(database_url)
    store = SessionStore(database_url, settings=Settings())
    try:
        assert _differences(store) == []
        assert "session_latency" not in inspect(store.engine).get_table_names()
        assert latency_rows(store) == _LATENCY_ROWS
        live = store.get("live")
        assert live is not None and live.processing_time_p50 is not None
        store.apply(Batch(events=(RecordEvent(session_id="live", at=at, processing_time=0.0),)))
        assert latency_rows(store) == {**_LATENCY_ROWS, ("live", 1, bucket_of(0.0)): 4}
    finally:
        store.dispose()
    command.downgrade(_alembic_config(database_url), "0007")
    with engine.connect() as connection:
        assert _latency_at_0007(connection) == {**_LATENCY_ROWS, ("live", 1, 0): 4}
        assert "latency" not in {c["name"] for c in inspect(connection).get_columns("sessions")}
    engine.dispose()
    upgrade_schema(database_url)  # and up again, from the restored rows
    store = SessionStore(database_url, settings=Settings())
    try:
        assert _differences(store) == []
        assert latency_rows(store) == {**_LATENCY_ROWS, ("live", 1, 0): 4}
    finally:
        store.dispose()


def _function_scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if plan["Node Type"] == "Function Scan":
        yield plan
    for child in plan.get("Plans", []):
        yield from _function_scans(child)


def test_0009_buckets_are_read_by_unnest_with_the_same_rows(pg_store: SessionStore) -> None:
    """Revision 0009's ``session_latency_buckets`` gives 0008's rows (every pair's bucket and
    count, in the array's order; none for NULL or an empty array), and the planner costs
    its unfolding of a column as a few elements per row, not ``generate_subscripts``' 1,000
    (which priced the dashboard's histogram statements over the JIT thresholds)."""
    store = pg_store
    arrays: list[list[int] | None] = [None, [], [-1, 7], [-4, 2, -1, 5, -400, 3]]
    with store.engine.connect() as connection:
        for array in arrays:
            rows = connection.exec_driver_sql(
                "SELECT key, value FROM session_latency_buckets(CAST(%(h)s AS bigint[]))",
                {"h": array},
            ).all()
            expected = [(-array[i] - 1, array[i + 1]) for i in range(0, len(array or []), 2)]
            assert [tuple(row) for row in rows] == expected
        plan = connection.exec_driver_sql(
            "EXPLAIN (FORMAT JSON) SELECT s.status, l.key, sum(l.value) FROM sessions s"
            " JOIN session_latency_buckets(s.latency) AS l ON true GROUP BY s.status, l.key"
        ).scalar_one()[0]["Plan"]
    (scan,) = _function_scans(plan)
    assert scan["Function Name"] == "unnest"
    assert scan["Total Cost"] < 1  # generate_subscripts' was 15.00 a row
