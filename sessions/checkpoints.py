"""Checkpoints of agent state (``ContextEngineAdapter``, LangGraph-style checkpointers): the
rules for what may be stored, and one statement (or two) per operation.

A checkpoint is written straight to the store in one transaction, not through the queue: its
caller reads it back to resume, so ``store_checkpoint`` returns once it is committed, and an
agent's state is larger than the events the queue is bounded for. Per thread the newest
``SESSIONS_CHECKPOINTS_PER_THREAD`` versions are kept; the purge deletes checkpoints (and
writes) stored longer than ``SESSIONS_ENDED_RETENTION_DAYS`` ago.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticSerializationError, to_jsonable_python
from sqlalchemy import Connection, delete, func, insert, select

from sessions.events import SessionId
from sessions.records import CheckpointRecord
from sessions.rules import check_storable
from sessions.tables import checkpoint_writes_table, checkpoints_table

#: Largest checkpoint (its data and metadata) or set of writes, as compact JSON.
MAX_CHECKPOINT_BYTES = 1024 * 1024


def as_json_value(value: Any) -> Any:
    """``value`` as plain JSON values (datetimes as ISO text, dataclasses and models as
    objects, tuples as lists), as pydantic serializes them; at most
    :data:`MAX_CHECKPOINT_BYTES` as JSON, and storable (no NUL, no lone surrogate).

    :raises ValueError: naming the rule that ``value`` breaks.
    """
    try:
        plain = to_jsonable_python(value)
        text = json.dumps(plain, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (PydanticSerializationError, TypeError, ValueError) as exc:
        raise ValueError(f"must be JSON-serializable ({exc})") from None
    _check_strings(plain)
    check_storable(text, MAX_CHECKPOINT_BYTES, "as JSON")  # the size (a NUL is escaped here)
    return plain


def _check_strings(plain: Any) -> None:
    """:func:`check_storable` on every string and key of ``plain`` as decoded, not on its JSON
    text: the text ``C:\\u0000`` holds no NUL, though its JSON has the escape's six characters.
    An explicit stack, not recursion (``json.dumps`` has already bounded the depth)."""
    stack = [plain]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            check_storable(value, MAX_CHECKPOINT_BYTES, "as JSON")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    check_storable(key, MAX_CHECKPOINT_BYTES, "as JSON")
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)


def _present(value: Any) -> Any:
    if value is None:
        raise ValueError("must not be None")
    return value


JsonValue = Annotated[Any, AfterValidator(_present), AfterValidator(as_json_value)]


def _writes_as_lists(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list of (channel, value) pairs")
    return [list(item) if isinstance(item, tuple) else item for item in value]


class CheckpointInput(BaseModel):
    """A checkpoint to store, checked: ids as session ids are, data and metadata as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    thread_id: SessionId
    checkpoint_id: SessionId
    data: JsonValue
    metadata: Annotated[dict[str, Any], AfterValidator(as_json_value)] | None = None


class WritesInput(BaseModel):
    """One task's intermediate writes towards a checkpoint, checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    thread_id: SessionId
    checkpoint_id: SessionId
    task_id: SessionId
    writes: Annotated[list[Any], BeforeValidator(_writes_as_lists), AfterValidator(as_json_value)]


def store_checkpoint(
    connection: Connection, checkpoint: CheckpointInput, now: datetime, keep: int
) -> CheckpointRecord:
    """Store ``checkpoint`` as its thread's newest version (replacing an earlier one of the
    same id), then keep only the thread's newest ``keep`` versions.

    Two stores for one thread at once may pick the same version: the second insert then
    violates the primary key and the store's transaction runs again (a retryable conflict).
    """
    c = checkpoints_table.c
    of_thread = c.thread_id == checkpoint.thread_id
    latest = connection.execute(select(func.max(c.version)).where(of_thread)).scalar()
    version = (latest or 0) + 1
    connection.execute(
        delete(checkpoints_table).where(of_thread, c.checkpoint_id == checkpoint.checkpoint_id)
    )
    row = {
        "thread_id": checkpoint.thread_id,
        "version": version,
        "checkpoint_id": checkpoint.checkpoint_id,
        "data": checkpoint.data,
        "metadata": checkpoint.metadata,
        "created_at": now,
    }
    connection.execute(insert(checkpoints_table).values(row))
    if version > keep:
        oldest_kept = connection.execute(
            select(c.version).where(of_thread).order_by(c.version.desc()).offset(keep - 1).limit(1)
        ).scalar()
        if oldest_kept is not None:
            connection.execute(delete(checkpoints_table).where(of_thread, c.version < oldest_kept))
    return CheckpointRecord.model_validate(row)


def get_checkpoint(
    connection: Connection, thread_id: str, checkpoint_id: str | None = None
) -> CheckpointRecord | None:
    """The checkpoint ``checkpoint_id`` of the thread, or its latest when ``None``."""
    found = list_checkpoints(connection, thread_id, limit=1, checkpoint_id=checkpoint_id)
    return found[0] if found else None


def list_checkpoints(
    connection: Connection, thread_id: str, limit: int, checkpoint_id: str | None = None
) -> list[CheckpointRecord]:
    """The thread's newest ``limit`` checkpoints (of ``checkpoint_id`` only, if given)."""
    c = checkpoints_table.c
    query = (
        select(c.thread_id, c.checkpoint_id, c.version, c.data, c.metadata, c.created_at)
        .where(c.thread_id == thread_id)
        .order_by(c.version.desc())
        .limit(limit)
    )
    if checkpoint_id is not None:
        query = query.where(c.checkpoint_id == checkpoint_id)
    return [CheckpointRecord.model_validate(row) for row in connection.execute(query).mappings()]


def put_writes(connection: Connection, writes: WritesInput, now: datetime) -> None:
    """Store one task's writes towards a checkpoint (replacing what that task stored before)."""
    w = checkpoint_writes_table.c
    connection.execute(
        delete(checkpoint_writes_table).where(
            w.thread_id == writes.thread_id,
            w.checkpoint_id == writes.checkpoint_id,
            w.task_id == writes.task_id,
        )
    )
    connection.execute(
        insert(checkpoint_writes_table).values(
            thread_id=writes.thread_id,
            checkpoint_id=writes.checkpoint_id,
            task_id=writes.task_id,
            writes=writes.writes,
            created_at=now,
        )
    )


def get_writes(connection: Connection, thread_id: str, checkpoint_id: str) -> list[tuple[Any, ...]]:
    """Every write towards the checkpoint, by task id, each as a tuple (as it was put)."""
    w = checkpoint_writes_table.c
    stored: Sequence[Any] = connection.execute(
        select(w.writes)
        .where(w.thread_id == thread_id, w.checkpoint_id == checkpoint_id)
        .order_by(w.task_id)
    ).scalars().all()
    return [tuple(item) if isinstance(item, list) else (item,) for task in stored for item in task]


def purge_checkpoints(connection: Connection, stored_before: datetime) -> int:
    """Delete checkpoints and writes stored before ``stored_before``; how many checkpoints."""
    connection.execute(
        delete(checkpoint_writes_table).where(checkpoint_writes_table.c.created_at < stored_before)
    )
    return connection.execute(
        delete(checkpoints_table).where(checkpoints_table.c.created_at < stored_before)
    ).rowcount
