"""Conversation messages per session run, and checkpoints (with their writes) per thread.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)


def upgrade() -> None:
    op.create_table(
        "conversation_messages",
        sa.Column("session_id", sa.String(255), primary_key=True),
        sa.Column("message_id", sa.Uuid(), primary_key=True),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=True),
    )
    op.create_index(
        "ix_conversation_messages_run_seq",
        "conversation_messages",
        ["session_id", "run", "seq", "message_id"],
    )
    op.create_table(
        "checkpoints",
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("version", sa.BigInteger(), primary_key=True),
        sa.Column("checkpoint_id", sa.String(255), nullable=False),
        sa.Column("data", JSON_DOCUMENT, nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_checkpoints_created_at", "checkpoints", ["created_at"])
    op.create_index(
        "ux_checkpoints_thread_checkpoint",
        "checkpoints",
        ["thread_id", "checkpoint_id"],
        unique=True,
    )
    op.create_table(
        "checkpoint_writes",
        sa.Column("thread_id", sa.String(255), primary_key=True),
        sa.Column("checkpoint_id", sa.String(255), primary_key=True),
        sa.Column("task_id", sa.String(255), primary_key=True),
        sa.Column("writes", JSON_DOCUMENT, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_checkpoint_writes_created_at", "checkpoint_writes", ["created_at"])


def downgrade() -> None:
    op.drop_table("checkpoint_writes")
    op.drop_table("checkpoints")
    op.drop_table("conversation_messages")
