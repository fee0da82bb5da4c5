"""sessions.worker.envelopes against a real, private redis-server and a real filesystem-broker
folder.

Each item is put straight into the queue, as ``redis-cli LPUSH`` or a stray file would, and
consumed with a kombu consumer as Celery's event loop consumes: without the guard the
installed kombu raises out of ``drain_events`` (the worker's ``Unrecoverable error``) and the
item is gone; with it the consumer receives the envelope the guard's ``replace`` made.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu.message import Message
from kombu.transport import filesystem as kombu_filesystem
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as kombu_virtual

from sessions import filesystem_broker
from sessions.events import Batch, RecordEvent
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.worker import envelopes
from sessions.worker.celery_app import SET_ASIDE_TASK, app, create_app
from tests.faults.servers import PrivateRedis, private_redis
from tests.support.workers_harness import CeleryProcess, service_environment, wait_until

QUEUE = "sessions.events"
#: Seconds the consumer waits for an item it has been given.
DRAIN_TIMEOUT = 10.0


def envelope(body: Any = '[["x"], {}, {}]', **properties: Any) -> dict[str, Any]:
    """An envelope as kombu's publish makes it, with ``properties`` changed (``...`` removes)."""
    made: dict[str, Any] = {
        "delivery_tag": str(uuid.uuid4()),
        "body_encoding": "utf-8",
        "delivery_info": {"exchange": "", "routing_key": QUEUE},
        "priority": 0,
    }
    made.update(properties)
    return {
        "body": body,
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {key: value for key, value in made.items() if value is not ...},
    }


def item(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


#: (what, the queue item, what the installed kombu raises, the reason the guard gives).
UNREADABLE: list[tuple[str, bytes, type[BaseException], str]] = [
    ("not JSON", b"this is not json {", json.JSONDecodeError, "not JSON (Expecting value"),
    ("not UTF-8", b"\xff\xfe\x00junk", json.JSONDecodeError, "not JSON"),
    ("empty", b"", json.JSONDecodeError, "not JSON"),
    ("a JSON array", b"[1, 2]", TypeError, "a JSON array, not an object"),
    ("a JSON string", b'"hello"', TypeError, "a JSON string, not an object"),
    ("an empty object", b"{}", KeyError, "properties: Field required"),
    (
        "no delivery_tag",
        item(envelope(delivery_tag=...)),
        KeyError,
        "properties.delivery_tag: Field required",
    ),
    (
        "properties a string",
        item({**envelope(), "properties": "x"}),
        AttributeError,
        "properties: Input should be a valid dictionary",
    ),
    (
        "a body that is not base64",
        item(envelope("!!!not base64!!!", body_encoding="base64")),
        ValueError,  # binascii.Error
        "body: not base64",
    ),
    (
        "a body encoding kombu does not know",
        item(envelope(body_encoding="rot13")),
        AttributeError,
        "properties.body_encoding: 'rot13' is none kombu knows",
    ),
    (
        "delivery_info a string",
        item(envelope(delivery_info="x")),
        TypeError,
        "properties.delivery_info: Input should be a valid dictionary",
    ),
    (
        "nested 100,000 deep",
        b"[" * 100_000 + b"]" * 100_000,
        RecursionError,
        "not JSON Python can decode: nested too deeply",
    ),
    (
        "an object nested 5,000 deep",
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
        RecursionError,
        "not JSON Python can decode: nested too deeply",
    ),
    (
        "headers nested 3,000 deep",
        b'{"headers": {"x": ' + b"[" * 3_000 + b"]" * 3_000 + b'}, "properties": {}}',
        RecursionError,
        "not JSON Python can decode: nested too deeply",
    ),
    (
        "delivery_info without its exchange",
        item(envelope(delivery_info={"routing_key": QUEUE})),
        KeyError,
        "properties.delivery_info.exchange: Field required",
    ),
]


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


@pytest.fixture
def without_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's own parse and delivery, as if :func:`envelopes.install` never ran."""
    import sessions.worker.celery_app  # noqa: F401  (installs it, so that kombu's originals are reachable)

    for module in envelopes.PARSING_MODULES:
        monkeypatch.setattr(module, "loads", module.loads.__wrapped__)
    original = kombu_virtual.Transport._deliver.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(kombu_virtual.Transport, "_deliver", original)
    assert not envelopes.installed()


@pytest.fixture
def replaced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, str]]]:
    """The guard, with a ``replace`` that notes what it is asked and answers with a plain
    kombu message saying so (``None``, i.e. drop, for a queue named ``other``)."""
    asked: list[tuple[str, str, str]] = []

    def replace(text: str, reason: str, queue: str) -> dict[str, Any] | None:
        asked.append((text, reason, queue))
        if queue == "other":
            return None
        return envelope(json.dumps({"set aside": reason}))

    import sessions.worker.celery_app  # noqa: F401

    original = kombu_virtual.Transport._deliver.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(kombu_virtual.Transport, "_deliver", original)
    envelopes.install(replace)
    assert envelopes.installed()
    yield asked


def consumer_on(connection: Connection, queue: str = QUEUE) -> list[Message]:
    """Consume ``queue`` of ``connection`` as Celery does (JSON only); what it receives."""
    received: list[Message] = []
    declared = Queue(queue, Exchange("sessions", type="direct"), queue)
    connection.Consumer(
        [declared], callbacks=[lambda _, message: received.append(message)], accept=["json"]
    ).consume()
    return received


@pytest.mark.usefixtures("without_the_guard")
@pytest.mark.parametrize(("what", "raw", "raised", "reason"), UNREADABLE)
def test_the_installed_kombu_still_needs_the_guard(
    redis_server: PrivateRedis, what: str, raw: bytes, raised: type[BaseException], reason: str
) -> None:
    """The fault itself, in the installed kombu: if this fails, kombu fixed it (drop the guard
    and the README's paragraph on it). The item is gone from Redis too."""
    with Connection(redis_server.url) as connection:
        consumer_on(connection)
        client = redis_server.client()
        client.lpush(QUEUE, raw)  # type: ignore[attr-defined]
        with pytest.raises(raised):
            connection.drain_events(timeout=DRAIN_TIMEOUT)
        assert client.llen(QUEUE) == 0 and client.hlen("unacked") == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("what", "raw", "raised", "reason"), UNREADABLE)
def test_an_unreadable_item_is_replaced_and_the_consumer_goes_on(
    redis_server: PrivateRedis,
    replaced: list[tuple[str, str, str]],
    what: str,
    raw: bytes,
    raised: type[BaseException],
    reason: str,
) -> None:
    with Connection(redis_server.url) as connection:
        received = consumer_on(connection)
        client = redis_server.client()
        client.lpush(QUEUE, raw)  # type: ignore[attr-defined]
        client.lpush(QUEUE, item(envelope('{"next": "message"}')))  # type: ignore[attr-defined]
        connection.drain_events(timeout=DRAIN_TIMEOUT)
        connection.drain_events(timeout=DRAIN_TIMEOUT)
        assert [m.payload for m in received] == [{"set aside": replaced[0][1]}, {"next": "message"}]
        ((text, why, queue),) = replaced
        assert why.startswith(reason) and queue == QUEUE
        assert text == raw.decode(errors="replace") or json.loads(text) == json.loads(raw)
        for message in received:
            message.ack()
        assert client.hlen("unacked") == 0  # type: ignore[attr-defined]


@pytest.mark.usefixtures("replaced")
def test_a_readable_message_reaches_the_consumer_untouched(redis_server: PrivateRedis) -> None:
    with Connection(redis_server.url) as connection:
        received = consumer_on(connection)
        queue = Queue(QUEUE, Exchange("sessions", type="direct"), QUEUE)
        with connection.Producer() as producer:
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key=QUEUE, headers={"h": 2})
        connection.drain_events(timeout=DRAIN_TIMEOUT)
        ((message),) = received
        assert message.payload == {"n": 1} and message.headers == {"h": 2}


def test_an_item_replace_declines_is_dropped_and_logged(
    redis_server: PrivateRedis,
    replaced: list[tuple[str, str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Connection(redis_server.url) as connection:
        received = consumer_on(connection, "other")
        redis_server.client().lpush("other", b"junk")  # type: ignore[attr-defined]
        with caplog.at_level(logging.ERROR, logger="sessions.worker.envelopes"):
            connection.drain_events(timeout=DRAIN_TIMEOUT)
        assert received == [] and [queue for _, _, queue in replaced] == ["other"]
        assert "dropped an unreadable message on other: not JSON" in caplog.text


def test_the_workers_replacement_is_a_set_aside_task_carrying_the_item(
    redis_server: PrivateRedis,
) -> None:
    """What ``sessions.worker.celery_app`` installs: a task message for ``sessions.set_aside``,
    read back by Celery's own message parsing, the item cut to the store's limit; other queues
    dropped."""
    replace = envelopes.set_aside_as_task(app, SET_ASIDE_TASK, (QUEUE,))
    assert replace("junk", "not JSON (x)", "celery.pidbox") is None
    huge = "x" * (envelopes.KEPT_BYTES * 3)
    made = replace(huge, "not JSON (Expecting value)", QUEUE)
    assert made is not None
    assert envelopes.problem(made, kombu_virtual.Channel.codecs) is None
    with Connection(redis_server.url) as connection:
        received = consumer_on(connection)
        redis_server.client().lpush(QUEUE, item(made))  # type: ignore[attr-defined]
        connection.drain_events(timeout=DRAIN_TIMEOUT)
    ((message),) = received
    assert message.headers["task"] == SET_ASIDE_TASK
    (text, reason), kwargs, _ = message.payload
    assert kwargs == {}
    assert (
        reason == f"unreadable message on {QUEUE} ({len(huge)} bytes): not JSON (Expecting value)"
    )
    assert text.startswith("x" * 1000)
    assert text.endswith(f"[cut at {envelopes.KEPT_BYTES} of {len(huge)} bytes]")


def test_kombus_own_uses_of_loads_fail_on_junk_as_before() -> None:
    """Redis's unacknowledged messages and the filesystem's exchange tables are unpacked from
    ``loads``: junk there still raises the JSON error it raised before the guard."""
    import sessions.worker.celery_app  # noqa: F401

    parsed = kombu_redis.loads("junk")
    with pytest.raises(json.JSONDecodeError):
        _message, _exchange, _routing_key = parsed
    with pytest.raises(json.JSONDecodeError):
        [row for row in kombu_filesystem.loads("junk")]
    assert kombu_redis.loads('["m", "e", "r"]') == ["m", "e", "r"]


def filesystem_connection(folder: Path) -> Connection:
    folder.mkdir(exist_ok=True)
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder.parent / "control"),  # kombu's default is ./control
    }
    return Connection(
        "filesystem://localhost//",
        transport=filesystem_broker.Transport,
        transport_options=options,
    )


def junk_file(folder: Path, junk: bytes = b"this is not json {") -> Path:
    """A stray file in the queue's folder, named as a message of the queue."""
    path = folder / filesystem_broker.message_filename(QUEUE)
    path.write_bytes(junk)
    return path


#: Too deep for Python's JSON decoder (review of issue 12, 2).
DEEP_JUNK = b"[" * 5_000 + b"]" * 5_000


@pytest.mark.usefixtures("without_the_guard")
@pytest.mark.parametrize(
    ("junk", "raised"),
    [(b"this is not json {", json.JSONDecodeError), (DEEP_JUNK, RecursionError)],
    ids=["not JSON", "too deep"],
)
def test_the_filesystem_transport_still_needs_the_guard(
    tmp_path: Path, junk: bytes, raised: type[BaseException]
) -> None:
    with filesystem_connection(tmp_path / "queue") as connection:
        consumer_on(connection)
        junk_file(tmp_path / "queue", junk)
        with pytest.raises(raised):
            connection.drain_events(timeout=DRAIN_TIMEOUT)


def test_a_too_deep_file_in_the_filesystem_queue_is_replaced(
    tmp_path: Path, replaced: list[tuple[str, str, str]]
) -> None:
    with filesystem_connection(tmp_path / "queue") as connection:
        received = consumer_on(connection)
        junk_file(tmp_path / "queue", DEEP_JUNK)
        connection.drain_events(timeout=DRAIN_TIMEOUT)
        ((message),) = received
        ((text, reason, _),) = replaced
        assert text == DEEP_JUNK.decode() and message.payload == {"set aside": reason}
        assert reason.startswith("not JSON Python can decode: nested too deeply")


def test_a_junk_file_in_the_filesystem_queue_is_replaced(
    tmp_path: Path, replaced: list[tuple[str, str, str]]
) -> None:
    with filesystem_connection(tmp_path / "queue") as connection:
        received = consumer_on(connection)
        junk_file(tmp_path / "queue")
        connection.drain_events(timeout=DRAIN_TIMEOUT)
        ((message),) = received
        ((text, reason, queue),) = replaced
        assert (text, queue) == ("this is not json {", QUEUE)
        assert message.payload == {"set aside": reason} and reason.startswith("not JSON")
        with pytest.raises(socket.timeout):  # nothing else: the stray file was taken once
            connection.drain_events(timeout=0.5)


def test_a_base64_body_is_checked() -> None:
    """The filesystem broker's bodies are base64 (kombu's default): a good one passes."""
    body = base64.b64encode(b'{"n": 3}').decode()
    good = envelope(body, body_encoding="base64")
    assert envelopes.problem(good, kombu_virtual.Channel.codecs) is None
    bad = envelope(body[:-1], body_encoding="base64")
    assert (envelopes.problem(bad, kombu_virtual.Channel.codecs) or "").startswith("body: not")


def test_install_wraps_once_and_the_workers_app_installs_it() -> None:
    import sessions.worker.celery_app  # noqa: F401  (importing the app is what a worker and a tracker do)

    assert envelopes.installed()
    wrapped = kombu_virtual.Transport._deliver
    envelopes.install(lambda text, reason, queue: None)
    assert kombu_virtual.Transport._deliver is wrapped


@pytest.mark.slow
def test_a_live_worker_on_the_filesystem_broker_sets_a_junk_file_aside_and_goes_on(
    tmp_path: Path,
) -> None:
    """The embedded broker of ``make demo``: a stray file in its queue folder reaches the
    dead letters, and the worker that read it applies the next batch."""
    broker_dir, database = tmp_path / "broker", f"sqlite:///{tmp_path / 'sessions.db'}"
    environment = service_environment(
        SESSIONS_BROKER_URL="filesystem://",
        SESSIONS_BROKER_DIR=str(broker_dir),
        SESSIONS_DATABASE_URL=database,
    )
    settings = Settings(broker_url="filesystem://", broker_dir=broker_dir, database_url=database)
    worker = CeleryProcess(
        "worker",
        ["worker", "--loglevel=INFO", "--concurrency=1", "--pool=solo"],
        environment,
        tmp_path,
    )
    store = SessionStore(database, settings=settings)
    client = create_app(settings)
    try:
        worker.wait_for_log(r"@\S+ ready\.")
        started = worker.process.pid
        junk_file(broker_dir / "queue")
        batch = Batch(events=(RecordEvent(session_id="after-junk", at=datetime.now(UTC)),))
        client.send_task("sessions.ingest", args=[batch.to_message()])
        wait_until(
            lambda: store.applied_batch_ids([batch.batch_id]) and store.dead_letters(),
            message="the junk set aside and the batch applied",
        )
        (letter,) = store.dead_letters()
        assert letter.reason.startswith(
            "reported by the worker's envelope guard: "
            "unreadable message on sessions.events (18 bytes): not JSON"
        )
        assert "this is not json {" in letter.payload
        assert worker.process.poll() is None and worker.process.pid == started
        assert "Unrecoverable error" not in worker.log
    finally:
        worker.stop()
        client.close()
        store.dispose()
