"""The embedded broker's transport: a consumer sees a message whole or not at all.

Each test probes the folder as a consumer would (``_get``) at the moments a producer's
``_put`` goes through: while it serializes the message and, for ours, just before the
rename that makes the written file visible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection
from kombu.transport import filesystem

from celeryconfig import FILESYSTEM_TRANSPORT, from_settings
from sessions.settings import Settings
from workers import filesystem_transport
from workers.app import create_app

QUEUE = "sessions.events"
PAYLOAD = {"body": "x" * 100_000, "properties": {}}


def _connection(folder: Path, transport: type) -> Connection:
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    return Connection("filesystem://localhost//", transport=transport, transport_options=options)


def _probe(channel: Any, seen: list[object]) -> Callable[[], None]:
    """What a consumer polling right now gets: a message, an error, or nothing (not noted)."""

    def probe() -> None:
        try:
            seen.append(channel._get(QUEUE))
        except Empty:
            pass
        except ValueError as exc:  # json.JSONDecodeError: the file it took was empty
            seen.append(exc)

    return probe


def test_kombus_own_filesystem_transport_hands_a_consumer_a_half_written_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why ``workers.filesystem_transport`` exists (kombu 5.7); fails once kombu fixes it."""
    connection = _connection(tmp_path / "queue", filesystem.Transport)
    seen: list[object] = []
    probe = _probe(connection.default_channel, seen)
    real_dumps = filesystem.dumps

    def dumps(value: Any) -> str:
        probe()
        return real_dumps(value)

    monkeypatch.setattr(filesystem, "dumps", dumps)
    try:
        connection.default_channel._put(QUEUE, PAYLOAD)
    finally:
        connection.release()
    assert len(seen) == 1 and isinstance(seen[0], json.JSONDecodeError), seen


def test_a_message_is_invisible_to_consumers_until_it_is_completely_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = _connection(tmp_path / "queue", filesystem_transport.Transport)
    channel = connection.default_channel
    assert isinstance(channel, filesystem_transport.Channel)
    seen: list[object] = []
    probe = _probe(channel, seen)
    real_dumps, real_replace = filesystem_transport.dumps, os.replace
    staged: list[int] = []

    def dumps(value: Any) -> str:
        probe()
        return real_dumps(value)

    def replace(source: str, target: str) -> None:
        staged.append(Path(source).stat().st_size)  # the whole body is on disk by now
        probe()
        real_replace(source, target)

    monkeypatch.setattr(filesystem_transport, "dumps", dumps)
    monkeypatch.setattr(os, "replace", replace)
    try:
        channel._put(QUEUE, PAYLOAD)
        assert seen == [] and staged and staged[0] > 100_000
        assert channel._get(QUEUE) == PAYLOAD
        with pytest.raises(Empty):
            channel._get(QUEUE)
    finally:
        connection.release()


def test_the_app_uses_it_for_the_filesystem_broker_and_only_there(tmp_path: Path) -> None:
    embedded = Settings(broker_url="filesystem://", broker_dir=tmp_path / "broker")
    assert from_settings(embedded)["broker_transport"] == FILESYSTEM_TRANSPORT
    with create_app(embedded).connection_for_write() as connection:
        assert isinstance(connection.transport, filesystem_transport.Transport)
    redis = Settings(broker_url="redis://127.0.0.1:6379/0")
    assert from_settings(redis)["broker_transport"] is None
