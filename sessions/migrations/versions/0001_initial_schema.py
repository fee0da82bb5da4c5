"""Initial schema: live sessions, past runs, the applied-batches ledger, dead letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)


def _run_columns() -> list[sa.Column[object]]:
    """The columns every run of a session has, live or archived."""
    return [
        sa.Column("user_id", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("end_reason", sa.String(16), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("last_activity", TIMESTAMP, nullable=False),
        sa.Column("ended_at", TIMESTAMP, nullable=True),
        sa.Column("request_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("error_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("total_processing_time", sa.Double(), server_default="0", nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost", sa.Double(), server_default="0", nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "applied_batches",
        sa.Column("batch_id", sa.Uuid(), primary_key=True),
        sa.Column("applied_at", TIMESTAMP, nullable=False),
    )
    op.create_index("ix_applied_batches_applied_at", "applied_batches", ["applied_at"])

    op.create_table(
        "dead_letters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("batch_id", sa.String(64), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])

    op.create_table(
        "session_runs",
        sa.Column("session_id", sa.String(255), primary_key=True),
        sa.Column("run", sa.Integer(), primary_key=True),
        *_run_columns(),
    )
    op.create_index("ix_session_runs_ended_at", "session_runs", ["ended_at"])
    op.create_index("ix_session_runs_user_id", "session_runs", ["user_id"])

    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(255), primary_key=True),
        sa.Column("run", sa.Integer(), server_default="1", nullable=False),
        *_run_columns(),
    )
    op.create_index("ix_sessions_ended_at", "sessions", ["ended_at"])
    op.create_index("ix_sessions_status_created_at", "sessions", ["status", "created_at"])
    op.create_index("ix_sessions_status_last_activity", "sessions", ["status", "last_activity"])
    op.create_index("ix_sessions_user_id_status", "sessions", ["user_id", "status"])


def downgrade() -> None:
    op.drop_table("sessions")
    op.drop_table("session_runs")
    op.drop_table("dead_letters")
    op.drop_table("applied_batches")
