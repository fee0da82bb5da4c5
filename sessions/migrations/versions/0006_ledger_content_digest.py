"""The ledger remembers what each batch said, so that a reused batch id is seen.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Rows claimed before this revision have no digest: a batch arriving under one of their ids is
taken for a redelivery, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("applied_batches", sa.Column("content_digest", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("applied_batches") as batch:
        batch.drop_column("content_digest")
