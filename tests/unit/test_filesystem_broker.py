"""The embedded broker's transport: a consumer never reads a message file half written."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

import celeryconfig
from sessions import filesystem_broker
from sessions.settings import Settings
from workers.app import create_app


@pytest.fixture
def queue_name() -> str:
    """A queue of the test's own: kombu keeps declared bindings per process, not per folder."""
    return f"sessions.events-{uuid.uuid4().hex[:8]}"


def _connection(folder: Path) -> Connection:
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
        "filesystem://localhost//",
        transport=celeryconfig.FILESYSTEM_TRANSPORT,
        transport_options=options,
    )


def test_a_message_is_complete_before_its_file_takes_a_name_a_consumer_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue_name: str
) -> None:
    """At the rename, the body is all written and the folder holds no file of the queue."""
    seen: list[tuple[list[str], bytes]] = []
    rename = os.replace

    def watched_replace(source: str, target: str) -> None:
        listing = sorted(os.listdir(tmp_path))
        seen.append((listing, Path(source).read_bytes()))
        rename(source, target)

    monkeypatch.setattr(filesystem_broker.os, "replace", watched_replace)
    with _connection(tmp_path) as connection:
        queue = connection.SimpleQueue(queue_name)
        queue.put({"n": 1, "text": "x" * 10_000})
        listing, body = seen[0]
        queued = [name for name in listing if name.partition(".")[2] == f"{queue_name}.msg"]
        assert queued == [], "a consumer could have taken the file before it was written"
        assert json.loads(body)["properties"]["delivery_info"]["routing_key"] == queue_name
        assert queue.get(timeout=5).payload == {"n": 1, "text": "x" * 10_000}
        queue.close()


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
            with _connection(tmp_path) as connection:
                queue = connection.SimpleQueue(queue_name)
                for n in range(per_producer):
                    queue.put({"producer": name, "n": n, "pad": "y" * 2_000})
                queue.close()
        except BaseException as exc:  # reported by the test's thread below
            failures.append(exc)

    producers = [threading.Thread(target=produce, args=(name,)) for name in ("a", "b")]
    with _connection(tmp_path) as connection:
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


def test_celery_apps_on_the_filesystem_broker_use_it_and_others_keep_their_own(
    tmp_path: Path,
) -> None:
    filesystem_app = create_app(Settings(broker_url="filesystem://", broker_dir=tmp_path))
    with filesystem_app.connection_for_write() as connection:
        assert isinstance(connection.transport, filesystem_broker.Transport)
    redis_app = create_app(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert redis_app.conf.broker_transport is None
    with redis_app.connection_for_write() as connection:
        assert connection.transport_cls == "redis"
