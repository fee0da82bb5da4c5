"""The embedded broker's transport: a consumer sees a message whole or not at all.

Each test probes the folder as a consumer would (``_get``) at the moments a producer's
``_put`` goes through: while it serializes the message and, for ours, just before the
rename that makes the written file visible.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection
from kombu.transport import filesystem

from sessions import filesystem_broker
from sessions.settings import Settings
from sessions.worker.celery_app import create_app
from sessions.worker.config import FILESYSTEM_TRANSPORT, from_settings
from sessions.worker.envelopes import Unreadable

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
            got = channel._get(QUEUE)
        except Empty:
            return
        except ValueError as exc:  # json.JSONDecodeError: the file it took was empty
            seen.append(exc)
            return
        # With sessions.worker.envelopes installed (importing sessions.worker.celery_app does),
        # kombu's parse returns the JSON error wrapped, for the worker to set the item aside.
        seen.append(got.error if isinstance(got, Unreadable) else got)

    return probe


def test_kombus_own_filesystem_transport_hands_a_consumer_a_half_written_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why ``sessions.filesystem_broker`` exists (kombu 5.7); fails once kombu fixes it."""
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
    connection = _connection(tmp_path / "queue", filesystem_broker.Transport)
    channel = connection.default_channel
    assert isinstance(channel, filesystem_broker.Channel)
    seen: list[object] = []
    probe = _probe(channel, seen)
    real_dumps, real_replace = filesystem_broker.dumps, os.replace
    staged: list[int] = []

    def dumps(value: Any) -> str:
        probe()
        return real_dumps(value)

    def replace(source: str, target: str) -> None:
        staged.append(Path(source).stat().st_size)  # the whole body is on disk by now
        probe()
        real_replace(source, target)

    monkeypatch.setattr(filesystem_broker, "dumps", dumps)
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
        assert isinstance(connection.transport, filesystem_broker.Transport)
    redis = Settings(broker_url="redis://127.0.0.1:6379/0")
    assert from_settings(redis)["broker_transport"] is None


def _shared_folder_connection(folder: Path) -> Connection:
    """A connection to ``folder`` as producers and a consumer share it, control folder too."""
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.01,
    }
    for name in ("processed", "control"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return Connection(
        "filesystem://localhost//", transport=FILESYSTEM_TRANSPORT, transport_options=options
    )


@pytest.fixture
def queue_name() -> str:
    """A queue of the test's own: kombu keeps declared bindings per process, not per folder."""
    return f"sessions.events-{uuid.uuid4().hex[:8]}"


def test_a_consumer_draining_while_producers_write_reads_every_message_whole(
    tmp_path: Path, queue_name: str
) -> None:
    """Two producer threads and a consumer on one folder: every message arrives, decoded.

    With kombu's own transport the consumer meets an empty file within a few hundred
    messages here and raises ``JSONDecodeError``.
    """
    per_producer = 400
    received: list[Any] = []
    failures: list[BaseException] = []

    def produce(name: str) -> None:
        try:
            with _shared_folder_connection(tmp_path) as connection:
                queue = connection.SimpleQueue(queue_name)
                for n in range(per_producer):
                    queue.put({"producer": name, "n": n, "pad": "y" * 2_000})
                queue.close()
        except BaseException as exc:  # reported by the test's thread below
            failures.append(exc)

    producers = [threading.Thread(target=produce, args=(name,)) for name in ("a", "b")]
    with _shared_folder_connection(tmp_path) as connection:
        # Declared once before the producers start: kombu writes a queue's binding to the
        # control folder the same unsafe way, and that is not what this test is about.
        queue = connection.SimpleQueue(queue_name)
        for thread in producers:
            thread.start()
        # Each get waits until the folder has a message, or the producers are done and it
        # is empty.
        while len(received) < 2 * per_producer:
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                if not any(thread.is_alive() for thread in producers):
                    break
                continue
            received.append(message.payload)
            message.ack()
        for thread in producers:
            thread.join()
        queue.close()
    assert failures == []
    assert sorted((m["producer"], m["n"]) for m in received) == sorted(
        (name, n) for name in ("a", "b") for n in range(per_producer)
    )
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".part", ".msg"))]
