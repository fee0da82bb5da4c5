"""Index active sessions by error rate, for the health sweep.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_sessions = sa.table(
    "sessions",
    sa.column("status", sa.String),
    sa.column("error_count", sa.BigInteger),
    sa.column("request_count", sa.BigInteger),
)
#: Exactly the expression the store's queries use (sessions.tables.ERROR_RATE), or the
#: planner would not match them.
ERROR_RATE = sa.cast(_sessions.c.error_count, sa.Double) / sa.cast(
    sa.func.nullif(_sessions.c.request_count, sa.literal_column("0")), sa.Double
)
ACTIVE_ONLY = _sessions.c.status == sa.literal_column("'active'")


def upgrade() -> None:
    op.create_index(
        "ix_sessions_active_error_rate",
        "sessions",
        [ERROR_RATE],
        postgresql_where=ACTIVE_ONLY,
        sqlite_where=ACTIVE_ONLY,
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_active_error_rate", table_name="sessions")
