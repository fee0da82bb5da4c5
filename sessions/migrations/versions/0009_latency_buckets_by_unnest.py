"""``session_latency_buckets`` reads the pairs with ``unnest(h) WITH ORDINALITY`` (PostgreSQL).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

The same rows as revision 0008's body (bucket and count of every pair, in the array's order),
read another way, because the planner costs the two forms 44 times apart. The function is
inlined into each statement that unfolds histograms (the dashboard's buckets by status, the
users' histograms and the ranking by p95). 0008's ``generate_subscripts(h, 1)`` has no row
estimate, so the planner takes 1,000 subscripts per session (0.5% of them kept): on 100,000
sessions a cost of some 733,000 for about 432,000 pairs. That is above ``jit_inline_above_cost``
and ``jit_optimize_above_cost`` (500,000), so every process of the parallel plan first spent
about 220 ms compiling it with LLVM (JIT timing 650 ms in all), and the grouping was planned
for 282,300 groups (a sort spilled to disk) where there are 524. ``unnest`` has a support
function that estimates 10 elements for an array column, so this form costs about 16,700:
no JIT, a hashed grouping in memory. On the same 100,000 sessions (README, Dashboard page
load) the buckets by status took 143 ms instead of 482, the ranking by p95 472 instead of 929.
SQLite is unchanged (``json_each``). The downgrade restores 0008's body.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The pairs of ``h`` as rows ``(key, value)``: each odd position's bucket slot (``-(b + 1)``)
#: and the count after it. Plain SQL, not STRICT, so the planner inlines it; ``unnest`` of
#: NULL or of an empty array gives no row, as before.
BUCKETS_BY_UNNEST = """
CREATE OR REPLACE FUNCTION session_latency_buckets(h bigint[])
RETURNS TABLE (key integer, value bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CAST(-u.slot - 1 AS integer), h[u.i + 1]
      FROM unnest(h) WITH ORDINALITY AS u(slot, i)
     WHERE u.i % 2 = 1
$$
"""
#: Revision 0008's body.
BUCKETS_BY_SUBSCRIPTS = """
CREATE OR REPLACE FUNCTION session_latency_buckets(h bigint[])
RETURNS TABLE (key integer, value bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CAST(-h[i] - 1 AS integer), h[i + 1] FROM generate_subscripts(h, 1) AS i
     WHERE i % 2 = 1
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(BUCKETS_BY_UNNEST)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(BUCKETS_BY_SUBSCRIPTS)
