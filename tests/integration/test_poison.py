"""A message whose handling kills the worker comes back forever; it must be set aside."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sessions.settings import get_settings
from sessions.store import SessionStore
from sessions.worker import tasks
from tests.integration.support import record_message


def _deliver(message: dict[str, Any], message_id: str, redelivered: bool) -> Any:
    """Run ingest as the worker does for one delivery of ``message``."""
    tasks.ingest.push_request(id=message_id, delivery_info={"redelivered": redelivered})
    try:
        return tasks.ingest.run(message)
    finally:
        tasks.ingest.pop_request()


def test_redeliveries_are_counted_per_message_and_survive(store: SessionStore) -> None:
    assert [store.count_redelivery("m-1") for _ in range(3)] == [1, 2, 3]
    assert store.count_redelivery("m-2") == 1


def test_a_message_redelivered_past_the_limit_is_dead_lettered(
    task_store: SessionStore,
) -> None:
    limit = get_settings().max_redeliveries
    message = record_message("poisoned", events=2)
    # The first delivery and `limit` redeliveries are all worked on (as if the worker died
    # in each; here they complete, and the ledger makes the later ones duplicates).
    for redelivered in [False] + [True] * limit:
        _deliver(message, "task-1", redelivered)
    assert task_store.dead_letters() == []
    # One more: set aside with the reason, and the worker goes on.
    result = _deliver(message, "task-1", redelivered=True)
    assert result == {"applied": 0, "duplicate": 0, "rejected": 1}
    (letter,) = task_store.dead_letters()
    assert f"redelivered unfinished {limit + 1} times" in letter.reason
    assert message["batch_id"] in letter.payload
    assert letter.batch_id == message["batch_id"]  # findable by id, not only in the text


def test_a_first_delivery_is_never_counted(task_store: SessionStore) -> None:
    _deliver(record_message("fresh"), "task-2", redelivered=False)
    assert task_store.count_redelivery("task-2") == 1


def test_purge_forgets_old_redelivery_counts(store: SessionStore) -> None:
    store.count_redelivery("old", now=datetime.now(UTC) - timedelta(days=30))
    store.count_redelivery("new")
    assert store.purge().redeliveries == 1
    assert store.count_redelivery("new") == 2 and store.count_redelivery("old") == 1


@pytest.mark.parametrize("redelivered", [False, True])
def test_a_healthy_message_is_applied_whether_or_not_redelivered(
    task_store: SessionStore,
    redelivered: bool,
) -> None:
    result = _deliver(record_message("ok", events=4), f"task-{redelivered}", redelivered)
    assert result == {"applied": 4, "duplicate": 0, "rejected": 0}
