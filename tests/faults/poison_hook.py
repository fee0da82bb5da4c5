"""Test code loaded into a worker for scenario 8: ``celery -A workers worker --include
tests.faults.poison_hook``.

It makes one message lethal without any hook in the product: applying a batch that holds an
event of session ``poison`` SIGKILLs the pool process doing it, as a crash in native code
would. The kill happens inside the task body (in ``SessionStore.apply``), after the task has
counted the redelivery, where a real crash while applying would happen. Each kill is noted,
with the Celery task id, in the file ``$FAULTS_POISON_KILLS`` (one line per kill) before it.

Importing this module outside such a worker changes nothing unless ``FAULTS_POISON_KILLS`` is
set.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from celery import current_task

from sessions.store import SessionStore

#: Events of this session kill the process that applies them.
POISON_SESSION = "poison"
#: Where each kill is noted (the variable must be set, or nothing is patched).
KILLS_ENV = "FAULTS_POISON_KILLS"


def is_poison(batch: Any) -> bool:
    if isinstance(batch, str | bytes):
        try:
            batch = json.loads(batch)
        except ValueError:
            return False
    if not isinstance(batch, dict):
        return False
    events = batch.get("events")
    return isinstance(events, list) and any(
        isinstance(event, dict) and event.get("session_id") == POISON_SESSION for event in events
    )


def _install() -> None:
    kills = os.environ.get(KILLS_ENV)
    if not kills:
        return
    original = SessionStore.apply

    def apply(self: SessionStore, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if is_poison(batch):
            task_id = getattr(getattr(current_task, "request", None), "id", None)
            with open(kills, "a") as notes:
                notes.write(f"{os.getpid()} {task_id}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, batch, *args, **kwargs)

    SessionStore.apply = apply  # type: ignore[method-assign]


_install()
