"""sessions.worker.consumer: a task message Celery would choke on is refused, and every refusal
counts.

Each message goes through the handler the worker's event loop calls
(``Consumer.create_task_handler``), with the real strategy of ``sessions.ingest`` and a
request handed on as the worker hands it to its pool (``execute_using_pool``); only the pool
and the connection are stand-ins. Celery's own consumer is run on the same messages, to show
the fault the guard is for on the installed Celery.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import Mock

import pytest
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message
from prometheus_client import CollectorRegistry

from sessions.worker import metrics, tasks
from sessions.worker.celery_app import app
from sessions.worker.consumer import MAX_MESSAGE_DEPTH, Consumer, message_problem
from tests.support.nesting import nested_list, nested_object

TASK = "sessions.ingest"


def headers(**changes: Any) -> dict[str, Any]:
    """The headers Celery's own ``send_task`` gives a call of ingest, with ``changes``
    (``...`` removes a header)."""
    made = app.amqp.as_task_v2(str(uuid.uuid4()), TASK, args=("{}",), kwargs={}).headers
    made.update(changes)
    return {key: value for key, value in made.items() if value is not ...}


BODY = [["{}"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]

#: (what, headers, body, what Celery's own consumer raises, the reason ours gives).
MALFORMED: list[tuple[str, dict[str, Any], Any, type[BaseException], str]] = [
    ("task a list", headers(task=["x"]), BODY, TypeError, "task: Input should be a valid string"),
    ("no id", headers(id=...), BODY, KeyError, "id: Field required"),
    ("id a list", headers(id=["x"]), BODY, TypeError, "id: Input should be a valid string"),
    ("timelimit a word", headers(timelimit="x"), BODY, ValueError, "timelimit: Input should"),
    ("timelimit of three", headers(timelimit=[1, 2, 3]), BODY, ValueError, "timelimit: Tuple"),
    ("body of one", headers(), [["{}"]], ValueError, "body: must be [args, kwargs, embed]"),
    (
        "protocol 1, task a list",
        {},
        {"task": ["x"], "id": "a"},
        TypeError,
        "task: a protocol 1 message",
    ),
]


#: A batch passed as an object (a form ``decode_batch`` takes), one event's metadata nested
#: 600 levels: within what ``json`` reads, beyond what pickle writes (review of issue 12, 1).
DEEP_BATCH = {
    "batch_id": str(uuid.uuid4()),
    "events": [
        {"kind": "create", "session_id": "bad", "at": "2026-01-01T00:00:00Z",
         "metadata": nested_object(600)},
    ],
}
DEEP = "must be nested at most 320 levels deep"

#: Messages Celery's consumer passes on to the pool, and no client of ours sends: a body in
#: Celery's "hybrid" form, a ``retries`` header that is no number (it fails the task when it
#: retries). (what, headers, body, the reason ours refuses them with).
PASSED_ON: list[tuple[str, dict[str, Any], Any, str]] = [
    ("body an object", headers(), {"args": ["{}"]}, "body: must be [args, kwargs, embed], not"),
    ("retries a word", headers(retries="x"), BODY, "retries: Input should be a valid integer"),
    ("a header nested 500 deep", headers(x=nested_list(500)), BODY, f"headers: {DEEP}"),
    ("an argument nested 500 deep", headers(), [[nested_list(500)], {}, {}], f"body: {DEEP}"),
    ("a batch object, metadata 600 deep", headers(), [[DEEP_BATCH], {}, {}], f"body: {DEEP}"),
]
REFUSED = [(what, h, body, reason) for what, h, body, _, reason in MALFORMED] + PASSED_ON


def message(headers: dict[str, Any], body: Any) -> Message:
    return Message(
        body=json.dumps(body).encode(),
        delivery_tag=str(uuid.uuid4()),
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={},
        delivery_info={"exchange": "", "routing_key": "sessions.events"},
        channel=Mock(),
        accept={"application/json"},
    )


def strategy_consumer(pool: Mock, requests: list[Any]) -> Mock:
    """What a task's strategy reads of the consumer; each request goes on to ``pool`` as the
    worker sends it there, and is noted in ``requests``."""
    consumer = Mock(hostname="test@host", connection_errors=(), disable_rate_limits=True, pool=pool)
    consumer.controller.state.revoked = set()
    consumer.task_buckets = {}
    consumer.event_dispatcher = None

    def on_task_request(request: Any) -> None:
        requests.append(request)
        request.execute_using_pool(pool)

    consumer.on_task_request = on_task_request
    return consumer


def handler(
    cls: type[CeleryConsumer], pool: Mock | None = None, requests: list[Any] | None = None
) -> Callable[[Message], Any]:
    """``cls``'s task handler over the real ingest strategy, requests going to ``pool``."""
    inner = strategy_consumer(pool or Mock(), [] if requests is None else requests)
    consumer = cls.__new__(cls)
    consumer.app = app
    consumer.connection_errors = ()
    consumer.call_soon_ack = Mock()
    consumer.on_task_message = set()
    consumer.restart_count = 0
    consumer._maximum_prefetch_restored = True
    consumer.event_dispatcher = None
    consumer.strategies = {TASK: tasks.ingest.start_strategy(app, inner, task_reserved=Mock())}
    return consumer.create_task_handler()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", metrics.WorkerMetrics(registry))
    yield registry


@pytest.mark.parametrize(("what", "headers", "body", "raised", "reason"), MALFORMED)
def test_the_installed_celery_still_needs_the_guard(
    what: str, headers: dict[str, Any], body: Any, raised: type[BaseException], reason: str
) -> None:
    """The fault itself: Celery's consumer raises into its event loop (``Unrecoverable
    error``); if this fails for every case, Celery fixed it (drop sessions/worker/consumer.py's
    check and the README's paragraph on it)."""
    handle = handler(CeleryConsumer)
    with pytest.raises(raised):
        handle(message(headers, body))


@pytest.mark.parametrize(("what", "headers", "body", "reason"), REFUSED)
def test_a_malformed_task_message_is_refused_naming_the_field(
    what: str,
    headers: dict[str, Any],
    body: Any,
    reason: str,
    counted: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = handler(Consumer)
    received = message(headers, body)
    handle(received)  # raises nothing
    assert "Received invalid task message: " + reason in caplog.text
    received.channel.basic_reject.assert_called_once_with(received.delivery_tag, requeue=False)
    refused = {"reason": "invalid_task_message"}
    assert counted.get_sample_value("sessions_messages_refused_total", refused) == 1


@pytest.mark.parametrize(("what", "headers", "body", "reason"), PASSED_ON)
def test_celery_passes_these_on_to_the_pool(
    what: str, headers: dict[str, Any], body: Any, reason: str
) -> None:
    pool = Mock()
    handler(CeleryConsumer, pool)(message(headers, body))
    pool.apply_async.assert_called_once()


@pytest.mark.parametrize(
    "value", [nested_list(500), DEEP_BATCH], ids=["a list 500 deep", "a batch, metadata 600 deep"]
)
def test_the_pool_cannot_pickle_a_deep_value(value: Any) -> None:
    """The fault the depth bound is for: the prefork pool pickles a request's headers and
    arguments in the worker's main process (``Unrecoverable error``)."""
    with pytest.raises(RecursionError):
        pickle.dumps(value)


def test_a_message_nested_to_the_bound_goes_on() -> None:
    pool = Mock()
    deepest = nested_list(MAX_MESSAGE_DEPTH - 2)  # the body and its args are two levels
    deep_header = headers(x=nested_list(MAX_MESSAGE_DEPTH - 1))
    handler(Consumer, pool)(message(deep_header, [[deepest], {}, {}]))
    pool.apply_async.assert_called_once()


def test_a_well_formed_call_goes_on_to_the_pool() -> None:
    pool, requests = Mock(), []
    handle = handler(Consumer, pool, requests)
    sent = message(headers(), BODY)
    handle(sent)
    (request,) = requests
    assert request.id == sent.headers["id"] and request.args == ["{}"]
    pool.apply_async.assert_called_once()
    sent.channel.basic_reject.assert_not_called()


@pytest.mark.parametrize(
    ("what", "headers", "body", "counted_as"),
    [
        ("an unregistered task", headers(task="sessions.evil"), BODY, "unknown_task"),
        ("no task at all", {}, {"hello": "world"}, "unknown_message"),
        ("a body that is not JSON", headers(), "{not json", "undecodable_body"),
    ],
)
def test_celerys_own_refusals_are_counted(
    what: str, headers: dict[str, Any], body: Any, counted_as: str, counted: CollectorRegistry
) -> None:
    handle = handler(Consumer)
    received = message(headers, body)
    if isinstance(body, str):
        received.body = body.encode()
    handle(received)
    assert counted.get_sample_value("sessions_messages_refused_total", {"reason": counted_as}) == 1


def test_a_message_celery_reports_itself_is_left_to_it() -> None:
    """No task header and no task in the body, or a body that cannot be decoded: Celery's
    handler says what it is (an unknown message, a decode error)."""
    assert message_problem({}, lambda: {"hello": "world"}) is None
    assert message_problem(headers(), lambda: (_ for _ in ()).throw(ValueError("bad"))) is None
    assert message_problem(None, lambda: BODY) is None
    assert message_problem(headers(), lambda: BODY) is None


def test_the_worker_runs_this_consumer() -> None:
    assert app.conf.worker_consumer == "sessions.worker.consumer:Consumer"
