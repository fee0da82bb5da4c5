"""Sweep indexes that the per-event update does not rewrite, so it can be a HOT update.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Every additive update changed ``last_activity`` and the error rate, both indexed, so no update
of a live row was HOT and each wrote an entry into all six of the table's indexes. The idle
sweep's index now holds ``last_activity_minute`` (``last_activity`` rounded down to its
minute) and the health sweep's ``error_rate_bound`` (an upper bound of the error rate in
sixteenths, kept while the rate stays in a band below it); both are filled here from the
existing rows. PostgreSQL's ``sessions`` also leaves 30% of each page free for updated rows
(pages written before keep their fill until rewritten).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE_ONLY = sa.text("status = 'active'")
#: Revision 0002's expression (``sessions.tables.ERROR_RATE`` then), recreated on downgrade.
ERROR_RATE = (
    "CAST(error_count AS DOUBLE PRECISION) / CAST(NULLIF(request_count, 0) AS DOUBLE PRECISION)"
)
#: ``sessions.tables.first_error_rate_bound`` in SQL: ``floor(16 r) + 2``, at most 18.
FIRST_BOUND = (
    "CASE WHEN request_count > 0 AND error_count > 0 "
    "THEN {least}(16 * error_count / request_count + 2, 18) ELSE 0 END"
)
#: ``sessions.database.minute_of`` (what ``sessions.tables.minute_start`` computes) per backend.
MINUTE_OF_LAST_ACTIVITY = {
    "postgresql": "date_trunc('minute', last_activity, 'UTC')",
    "sqlite": "strftime('%Y-%m-%d %H:%M:00.000000', last_activity)",
}
LEAST = {"postgresql": "LEAST", "sqlite": "min"}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index("ix_sessions_active_error_rate", table_name="sessions")
    op.drop_index("ix_sessions_status_last_activity", table_name="sessions")
    op.add_column("sessions", sa.Column("error_rate_bound", sa.SmallInteger(), server_default="0"))
    op.add_column("sessions", sa.Column("last_activity_minute", sa.DateTime(timezone=True)))
    op.execute(
        f"UPDATE sessions SET last_activity_minute = {MINUTE_OF_LAST_ACTIVITY[dialect]},"
        f" error_rate_bound = {FIRST_BOUND.format(least=LEAST[dialect])}"
    )
    # SQLite cannot add NOT NULL to a column in place: batch mode copies the table (its
    # remaining indexes are plain columns, which the copy recreates).
    with op.batch_alter_table("sessions") as batch:
        batch.alter_column("last_activity_minute", nullable=False)
        batch.alter_column("error_rate_bound", nullable=False)
    op.create_index(
        "ix_sessions_status_activity_minute", "sessions", ["status", "last_activity_minute"]
    )
    op.create_index(
        "ix_sessions_active_error_rate_bound",
        "sessions",
        ["error_rate_bound"],
        postgresql_where=ACTIVE_ONLY,
        sqlite_where=ACTIVE_ONLY,
    )
    if dialect == "postgresql":
        op.execute("ALTER TABLE sessions SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE sessions RESET (fillfactor)")
    op.drop_index("ix_sessions_active_error_rate_bound", table_name="sessions")
    op.drop_index("ix_sessions_status_activity_minute", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("error_rate_bound")
        batch.drop_column("last_activity_minute")
    op.create_index("ix_sessions_status_last_activity", "sessions", ["status", "last_activity"])
    # The same statement on both backends (a partial expression index).
    op.execute(
        f"CREATE INDEX ix_sessions_active_error_rate ON sessions (({ERROR_RATE}))"
        f" WHERE {ACTIVE_ONLY}"
    )
