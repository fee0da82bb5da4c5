"""Each run's latency histogram in its own row: ``sessions.latency`` and ``session_runs.latency``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

The histogram was one ``session_latency`` row per (session, run, bucket), a second upsert
and index entry per session of every batch. It is now a column of the run's row, merged in
the same upsert as the counters (README, Performance, item 5). PostgreSQL keeps ``bigint[]``
of sparse pairs ``{-(b + 1), count, ...}``, merged by ``session_latency_add`` and read back as
rows by ``session_latency_buckets``; SQLite a JSON object ``{"b": count}``. Every
``session_latency`` row moves into its run's column (the live run's into ``sessions``, an
ended run's into ``session_runs``; a row of neither, which the store never leaves, is
dropped with the table). The downgrade restores the table and its rows from the columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The run tables that get a histogram column.
RUN_TABLES = ("sessions", "session_runs")

#: ``h`` with ``d``'s counts added, bucket by bucket. Loops only over the delta's pairs (a
#: few per session per batch); ``array_position`` finds a bucket's slot, which is negative,
#: so it never matches a count.
MERGE_FUNCTION = """
CREATE FUNCTION session_latency_add(h bigint[], d bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    k int;
    i int;
BEGIN
    IF h IS NULL THEN RETURN d; END IF;
    IF d IS NULL THEN RETURN h; END IF;
    FOR k IN 1 .. cardinality(d) BY 2 LOOP
        i := array_position(h, d[k]);
        IF i IS NULL THEN
            h := h || d[k:k + 1];
        ELSE
            h[i + 1] := h[i + 1] + d[k + 1];
        END IF;
    END LOOP;
    RETURN h;
END
$$
"""
#: The pairs of ``h`` as rows ``(key, value)``: bucket and count, the shape of SQLite's
#: ``json_each`` so that one statement reads both. Plain SQL, so the planner inlines it.
BUCKETS_FUNCTION = """
CREATE FUNCTION session_latency_buckets(h bigint[]) RETURNS TABLE (key integer, value bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CAST(-h[i] - 1 AS integer), h[i + 1] FROM generate_subscripts(h, 1) AS i
     WHERE i % 2 = 1
$$
"""
#: One run's ``session_latency`` rows as its column value, per backend (``{t}`` the run table).
FOLDED = {
    "postgresql": (
        "SELECT array_agg(u.n ORDER BY l.bucket, u.o) FROM session_latency l,"
        " unnest(ARRAY[-(l.bucket + 1), l.count]) WITH ORDINALITY AS u(n, o)"
        " WHERE l.session_id = {t}.session_id AND l.run = {t}.run"
    ),
    "sqlite": (
        "SELECT json_group_object(CAST(l.bucket AS TEXT), l.count) FROM session_latency l"
        " WHERE l.session_id = {t}.session_id AND l.run = {t}.run"
    ),
}
#: A run table's histograms as ``session_latency`` rows, per backend (``{t}`` the table).
UNFOLDED = {
    "postgresql": (
        "SELECT t.session_id, t.run, b.key, b.value FROM {t} t,"
        " session_latency_buckets(t.latency) AS b"
    ),
    "sqlite": (
        "SELECT t.session_id, t.run, CAST(b.key AS INTEGER), b.value FROM {t} t,"
        " json_each(t.latency) AS b"
    ),
}


def _histogram_type(dialect: str) -> sa.types.TypeEngine[object]:
    return postgresql.ARRAY(sa.BigInteger()) if dialect == "postgresql" else sa.Text()


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(MERGE_FUNCTION)
        op.execute(BUCKETS_FUNCTION)
    for name in RUN_TABLES:
        op.add_column(name, sa.Column("latency", _histogram_type(dialect), nullable=True))
        op.execute(
            f"UPDATE {name} SET latency = ({FOLDED[dialect].format(t=name)})"
            f" WHERE EXISTS (SELECT 1 FROM session_latency l"
            f" WHERE l.session_id = {name}.session_id AND l.run = {name}.run)"
        )
    op.drop_table("session_latency")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "session_latency",
        sa.Column("session_id", sa.String(255), primary_key=True),
        sa.Column("run", sa.Integer(), primary_key=True),
        sa.Column("bucket", sa.SmallInteger(), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )
    for name in RUN_TABLES:
        op.execute(
            "INSERT INTO session_latency (session_id, run, bucket, count) "
            + UNFOLDED[dialect].format(t=name)
        )
        # Plain ALTER on both (SQLite since 3.35): a batch copy of ``sessions`` would have to
        # recreate its partial index, and the column is in no index.
        op.execute(f"ALTER TABLE {name} DROP COLUMN latency")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION session_latency_buckets(bigint[])")
        op.execute("DROP FUNCTION session_latency_add(bigint[], bigint[])")
