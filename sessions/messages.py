"""The statements behind a session's conversation: writing ``message`` events, keeping each
run's conversation to its bound, reading it back in order, and deleting purged runs' messages.

A message belongs to the session run that was live at its event time, as a ``record`` does
(:mod:`sessions.apply`), so a late or redelivered batch never adds to the wrong run's
conversation. Order is the producers' (``seq``, then ``message_id``), never the order in which
batches happened to be applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, and_, delete, func, insert, or_, select

from sessions.events import MessageEvent
from sessions.tables import messages_table, runs_table, sessions_table

#: Sessions (or runs) per ``IN`` list, so bound parameters stay few on every backend.
CHUNK = 500


def insert_messages(connection: Connection, events: Sequence[MessageEvent]) -> set[tuple[str, int]]:
    """Store ``events`` in their runs' conversations; the (session id, run) pairs written.

    Call it after the batch's sessions are written: every session then has a live row (a
    message auto-creates its session, as a record does), locked by this transaction.
    """
    if not events:
        return set()
    live = _live_runs(connection, sorted({event.session_id for event in events}))
    rows: list[dict[str, Any]] = []
    written: set[tuple[str, int]] = set()
    for event in events:
        run, created_at = live[event.session_id]
        if run > 1 and event.at < created_at:
            run = _run_at(connection, event.session_id, event.at) or run
        rows.append(
            {
                "session_id": event.session_id,
                "message_id": event.message_id,
                "run": run,
                "seq": event.seq,
                "at": event.at,
                "role": event.role,
                "content": event.content,
                "metadata": event.metadata,
            }
        )
        written.add((event.session_id, run))
    connection.execute(insert(messages_table), rows)
    return written


def _live_runs(connection: Connection, session_ids: list[str]) -> dict[str, tuple[int, datetime]]:
    s = sessions_table.c
    live: dict[str, tuple[int, datetime]] = {}
    for start in range(0, len(session_ids), CHUNK):
        chunk = session_ids[start : start + CHUNK]
        query = select(s.session_id, s.run, s.created_at).where(s.session_id.in_(chunk))
        for row in connection.execute(query):
            live[row.session_id] = (row.run, row.created_at)
    return live


def _run_at(connection: Connection, session_id: str, at: datetime) -> int | None:
    """The past run that was live at ``at`` (the first, for a time before every run); ``None``
    when the past runs are purged already (the message then goes to the live run)."""
    r = runs_table.c
    found = connection.execute(
        select(func.max(r.run)).where(r.session_id == session_id, r.created_at <= at)
    ).scalar()
    if found is None:
        found = connection.execute(
            select(func.min(r.run)).where(r.session_id == session_id)
        ).scalar()
    return None if found is None else int(found)


def trim(connection: Connection, runs: Iterable[tuple[str, int]], keep: int) -> int:
    """Delete all but the newest ``keep`` messages of each run; how many were deleted.

    One index probe finds a run's ``keep``-th newest message; a run with fewer costs nothing
    more.
    """
    m = messages_table.c
    deleted = 0
    for session_id, run in sorted(runs):
        of_run = (m.session_id == session_id, m.run == run)
        boundary = connection.execute(
            select(m.seq, m.message_id)
            .where(*of_run)
            .order_by(m.seq.desc(), m.message_id.desc())
            .offset(keep - 1)
            .limit(1)
        ).first()
        if boundary is None:
            continue
        older = or_(
            m.seq < boundary.seq, and_(m.seq == boundary.seq, m.message_id < boundary.message_id)
        )
        deleted += connection.execute(delete(messages_table).where(*of_run, older)).rowcount
    return deleted


def newest_of_live_run(session_id: str, limit: int) -> Select[tuple[object, ...]]:
    """The newest ``limit`` messages of the session's live run, newest first."""
    m, s = messages_table.c, sessions_table.c
    live = messages_table.join(
        sessions_table, and_(s.session_id == m.session_id, s.run == m.run)
    )
    return (
        select(m.session_id, m.run, m.message_id, m.seq, m.at, m.role, m.content, m.metadata)
        .select_from(live)
        .where(m.session_id == session_id)
        .order_by(m.seq.desc(), m.message_id.desc())
        .limit(limit)
    )

