"""Checkpoints in the store: versioned per thread, the latest by default, bounded, purged by
age, and refused with the field and rule named when they cannot be stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from sessions.checkpoints import MAX_CHECKPOINT_BYTES
from sessions.decoding import describe_error
from sessions.settings import Settings
from sessions.store import SessionStore

#: The bound a checkpoint's JSON must keep, as the refusal names it.
TOO_LARGE = f"{MAX_CHECKPOINT_BYTES} bytes as JSON"


def test_the_latest_is_the_default_and_every_version_can_be_read(store: SessionStore) -> None:
    store.store_checkpoint("agent-1", "v1", {"state": 1}, {"type": "agent_state"})
    store.store_checkpoint("agent-1", "v2", {"state": 2})
    store.store_checkpoint("agent-2", "v9", {"state": 9})
    latest = store.get_checkpoint("agent-1")
    assert latest is not None and (latest.checkpoint_id, latest.version) == ("v2", 2)
    first = store.get_checkpoint("agent-1", "v1")
    assert first is not None and first.data == {"state": 1}
    assert first.metadata == {"type": "agent_state"}
    assert [c.checkpoint_id for c in store.list_checkpoints("agent-1")] == ["v2", "v1"]
    assert [c.checkpoint_id for c in store.list_checkpoints("agent-1", limit=1)] == ["v2"]
    assert store.get_checkpoint("agent-1", "v7") is None
    assert store.get_checkpoint("nobody") is None


def test_storing_an_id_again_replaces_it_as_the_newest_version(store: SessionStore) -> None:
    store.store_checkpoint("agent-1", "v1", {"state": 1})
    store.store_checkpoint("agent-1", "v2", {"state": 2})
    store.store_checkpoint("agent-1", "v1", {"state": 3})
    assert [(c.checkpoint_id, c.version, c.data) for c in store.list_checkpoints("agent-1")] == [
        ("v1", 3, {"state": 3}),
        ("v2", 2, {"state": 2}),
    ]


def test_a_thread_keeps_its_newest_versions_only(database_url: str) -> None:
    store = SessionStore(database_url, settings=Settings(checkpoints_per_thread=3))
    try:
        for n in range(1, 6):
            store.store_checkpoint("agent-1", f"v{n}", {"n": n})
        store.store_checkpoint("agent-2", "v1", {"n": 1})
        assert [c.checkpoint_id for c in store.list_checkpoints("agent-1", 10)] == [
            "v5",
            "v4",
            "v3",
        ]
        assert [c.checkpoint_id for c in store.list_checkpoints("agent-2", 10)] == ["v1"]
    finally:
        store.dispose()


def test_data_is_kept_as_json_values(store: SessionStore) -> None:
    moment = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    store.store_checkpoint("agent-1", "v1", {"at": moment, "pair": (1, "a"), "none": None})
    found = store.get_checkpoint("agent-1")
    assert found is not None
    assert found.data == {"at": "2024-01-01T12:00:00Z", "pair": [1, "a"], "none": None}


def test_writes_round_trip_by_task_and_replace_per_task(store: SessionStore) -> None:
    store.put_writes("thread-1", "c1", "task-b", [("channel", {"x": 1})])
    store.put_writes("thread-1", "c1", "task-a", [("messages", "hi"), ("count", 2)])
    store.put_writes("thread-1", "c1", "task-b", [("channel", {"x": 2})])
    store.put_writes("thread-1", "c2", "task-a", [("other", 0)])
    assert store.get_writes("thread-1", "c1") == [
        ("messages", "hi"),
        ("count", 2),
        ("channel", {"x": 2}),
    ]
    assert store.get_writes("thread-1", "none") == []


def test_old_checkpoints_and_writes_are_purged(store: SessionStore) -> None:
    store.store_checkpoint("agent-1", "v1", {"n": 1})
    store.put_writes("agent-1", "v1", "task", [("c", 1)])
    kept = store.purge(ended_before=datetime.now(UTC) - timedelta(days=1))
    assert kept.checkpoints == 0 and store.get_checkpoint("agent-1") is not None
    purged = store.purge(ended_before=datetime.now(UTC) + timedelta(seconds=1))
    assert purged.checkpoints == 1
    assert store.get_checkpoint("agent-1") is None and store.get_writes("agent-1", "v1") == []


def test_text_holding_a_backslash_and_u0000_is_no_nul(store: SessionStore) -> None:
    """Review of issue 12, finding 8: ``C:\\u0000dir`` was refused (``must not contain NUL
    characters``): the check looked for the escape's six characters in the JSON text."""
    data = {"path": "C:\\u0000dir", "C:\\u0000": "key"}
    store.store_checkpoint("agent-1", "v1", data)
    stored = store.get_checkpoint("agent-1")
    assert stored is not None and stored.data == data


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"thread_id": "agent 1"}, "thread_id: must be 1 to 255 printable ASCII"),
        ({"checkpoint_id": ""}, "checkpoint_id: must be 1 to 255 printable ASCII"),
        ({"data": {"x": object()}}, "data: must be JSON-serializable"),
        ({"data": {"x": float("inf")}}, "data: must be JSON-serializable"),
        ({"data": None}, "data: must not be None"),
        ({"data": {"x": "a\x00b"}}, "data: must not contain NUL characters"),
        ({"data": {"a\x00": 1}}, "data: must not contain NUL characters"),
        ({"data": {"x": "\udc00"}}, "data: must be valid Unicode"),
        ({"data": {"x": "a" * MAX_CHECKPOINT_BYTES}}, f"data: must be at most {TOO_LARGE}"),
        ({"metadata": {"x": object()}}, "metadata: must be JSON-serializable"),
    ],
)
def test_a_checkpoint_that_cannot_be_stored_is_refused_naming_the_field(
    store: SessionStore, arguments: dict[str, Any], reason: str
) -> None:
    checkpoint: dict[str, Any] = {
        "thread_id": "agent-1",
        "checkpoint_id": "v1",
        "data": {"state": 1},
        "metadata": None,
        **arguments,
    }
    with pytest.raises(ValidationError) as refused:
        store.store_checkpoint(**checkpoint)
    assert describe_error(refused.value).startswith(reason)
    assert store.get_checkpoint("agent-1") is None
