"""Latency histograms per session run, and events per minute.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25

Sessions recorded before this revision have no histogram: their percentiles read as unknown
until new requests arrive, and then describe only those.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "session_latency",
        sa.Column("session_id", sa.String(255), primary_key=True),
        sa.Column("run", sa.Integer(), primary_key=True),
        sa.Column("bucket", sa.SmallInteger(), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "activity_minutes",
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("events", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("activity_minutes")
    op.drop_table("session_latency")
