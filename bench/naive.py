"""The naive design, for comparison only: one Celery task per metric update.

Run as ``celery -A bench.naive worker`` with ``SESSIONS_BROKER_URL`` and
``SESSIONS_DATABASE_URL`` in the environment (``bench.ingest`` does this). Every update is
one message, and the worker applies it as one atomic ``UPDATE`` (``x = x + delta``, so no
update is lost) in a transaction of its own, on a session row created beforehand.

The Celery settings mirror the pipeline's own (JSON, ``acks_late``, no results, the same
prefetch), so the comparison measures the design, not a difference in configuration.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import Engine, create_engine, text

#: Queue of the naive tasks (kept apart from the pipeline's queues on a shared broker).
QUEUE = "bench.naive"
TASK = "bench.naive.update"

UPDATE = text(
    """
    UPDATE sessions
       SET request_count = request_count + 1,
           error_count = error_count + :error,
           total_processing_time = total_processing_time + :processing_time,
           last_activity = GREATEST(last_activity, :at)
     WHERE session_id = :session_id
    """
)

app = Celery("bench.naive", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("SESSIONS_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    result_backend=None,
    worker_prefetch_multiplier=4,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)

_engine: Engine | None = None


def engine() -> Engine:
    """The process's engine, made on first use (so after the prefork children fork)."""
    global _engine
    if _engine is None:
        _engine = create_engine(os.environ["SESSIONS_DATABASE_URL"], pool_size=1)
    return _engine


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def update(session_id: str, processing_time: float, error: bool, at: str) -> None:
    """Apply one metric update in its own transaction."""
    with engine().begin() as connection:
        connection.execute(
            UPDATE,
            {
                "session_id": session_id,
                "processing_time": processing_time,
                "error": int(error),
                "at": datetime.fromisoformat(at),
            },
        )


def send(session_id: str, processing_time: float, error: bool, at: str) -> Any:
    """The naive client's ``record``: one synchronous publish per update."""
    return app.send_task(TASK, args=[session_id, processing_time, error, at], queue=QUEUE)
