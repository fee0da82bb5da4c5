"""The migrated schema is exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect

from sessions.database import upgrade_schema
from sessions.store import SessionStore
from sessions.tables import Base


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
        "session_latency",
        "activity_minutes",
    } <= tables
    indexes = {index["name"] for index in inspector.get_indexes("sessions")}
    assert {
        "ix_sessions_status_last_activity",
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


def test_the_health_index_is_created_with_the_queries_expression(store: SessionStore) -> None:
    """Expression indexes escape compare_metadata; check its definition directly."""
    with store.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            definition = connection.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_sessions_active_error_rate'"
            ).scalar_one()
        else:
            definition = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'ix_sessions_active_error_rate'"
            ).scalar_one()
    assert "error_count" in definition and "nullif(request_count, 0)" in definition.lower()
    assert "'active'" in definition
