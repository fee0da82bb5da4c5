"""Count redeliveries of unfinished messages, to set poison messages aside.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "redeliveries",
        sa.Column("message_id", sa.String(255), primary_key=True),
        sa.Column("redeliveries", sa.Integer(), nullable=False),
        sa.Column("last_redelivered_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_redeliveries_last_redelivered_at", "redeliveries", ["last_redelivered_at"]
    )


def downgrade() -> None:
    op.drop_table("redeliveries")
