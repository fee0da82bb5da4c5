"""The worker's consumer: a task message Celery cannot take is refused, not fatal; refusals count.

The fault (Celery 5.7.0, any broker): Celery's consumer (``Consumer.create_task_handler``)
reads a task message's headers and body in the worker's main process, in the event loop, and
catches only ``KeyError`` for a missing ``task`` header and, around the task's strategy,
``InvalidTaskError``, ``ContentDisallowed`` and ``DecodeError``. What else a malformed message
makes it raise escapes to the event loop: a ``task`` header that is a list (``TypeError:
unhashable type``, looking up the strategy), a missing or unhashable ``id``, a ``timelimit``
that is not two numbers (``ValueError`` unpacking it, or a pool that stalls on it), a body
that is not ``[args, kwargs, embed]`` (``ValueError`` unpacking it in ``Request.__init__``),
the same in Celery's protocol 1. The worker logs ``Unrecoverable error`` and exits; a
``KeyError`` from the strategy counts as a connection error on Redis, so the consumer
reconnects, the message is restored, and the loop repeats forever. Each was reproduced on
the installed Celery with a message that any client of the broker could publish (see
``tests/unit/test_consumer.py``); a ``retries`` header that is not a number even reaches the
task, and fails a valid batch.

:class:`Consumer` (``worker_consumer`` in :mod:`sessions.worker.config`, Celery's own extension
point) checks each message against what Celery's protocol 2 promises (:class:`TaskHeaders`,
:data:`Body`) before Celery's handler reads it, and refuses one that breaks it through Celery's
own path for invalid task messages: logged at ERROR (``Received invalid task message: <field>:
<rule>``) and rejected without requeue. Protocol 1 messages (no ``task`` header, the task in the
body), which no client of this project sends, are refused the same way. A message whose body
cannot be decoded at all goes on to Celery's handler, which refuses it as before. Every refusal,
Celery's own included, is counted in ``sessions_messages_refused_total{reason}``.

Headers and body are also bounded in how deeply they nest (:data:`MAX_MESSAGE_DEPTH`): the
prefork pool pickles them in the main process to hand the request to a pool process, and
pickle gives up with ``RecursionError`` at about 500 levels (Python 3.11), which is an
``Unrecoverable error`` too; the message goes back to the queue and kills the next worker that
takes it, forever. A list nested 500 deep in a header is about 1 KB. Such a message is refused
like the others, before its body is handed on (the batch in it is not applied nor
dead-lettered: the refusal is logged and counted).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any

from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictStr, TypeAdapter, ValidationError

from sessions.decoding import describe_error
from sessions.deep_json import deeper_than
from sessions.worker import metrics
from sessions.worker.metrics import RefusalReason

log = logging.getLogger(__name__)

#: Deepest nesting of a message's headers, and of its body, that is handed to the pool: far
#: above what Celery's own fields need, and high enough that a batch passed as an object
#: whose event metadata nests some 300 levels (at level 6 of the body) still reaches the
#: event model, which refuses that event alone (it allows 32); below where pickle gives up
#: (about 490 levels at the top of a stack, 500 to 600 in a worker's main process).
MAX_MESSAGE_DEPTH = 320
#: A time limit in seconds, as Celery's pool takes it.
Seconds = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]


class TaskHeaders(BaseModel):
    """The headers of a protocol 2 task message that Celery's main process reads, with the
    types it needs; the others are left to Celery (``eta`` and ``expires`` it checks itself)."""

    model_config = ConfigDict(extra="allow")

    task: StrictStr
    id: StrictStr
    retries: Annotated[int, Strict(), Field(ge=0)] = 0
    timelimit: tuple[Seconds | None, Seconds | None] | None = None
    root_id: StrictStr | None = None
    parent_id: StrictStr | None = None
    group: StrictStr | None = None
    shadow: StrictStr | None = None


#: A protocol 2 body: positional arguments, keyword arguments, and what Celery embeds
#: (callbacks, errbacks, chain, chord).
Body = tuple[list[Any], dict[StrictStr, Any], dict[StrictStr, Any]]
#: The parts of a :data:`Body`, in order.
BODY_PARTS = ("args", "kwargs", "embed")
_body: TypeAdapter[tuple[list[Any], dict[str, Any], dict[str, Any]]] = TypeAdapter(Body)


def message_problem(headers: Any, payload: Callable[[], Any]) -> str | None:
    """What stops a message with ``headers`` being handed to Celery's handler; ``None`` if
    nothing does. ``payload`` decodes the body (asked only for a task message).

    A message without a ``task`` header is a problem only if its body names a task
    (protocol 1); one that names none is Celery's to report (an unknown message). A body
    that cannot be decoded is Celery's to report too (a decode error).
    """
    if not isinstance(headers, dict):
        return None  # Celery reports it as an unknown message
    if "task" not in headers:
        try:
            body = payload()
        except Exception:
            return None
        if isinstance(body, dict) and "task" in body:
            return "task: a protocol 1 message (the task in the body); only protocol 2 is taken"
        return None
    try:
        TaskHeaders.model_validate(headers)
    except ValidationError as exc:
        return describe_error(exc)
    if deeper_than(headers, MAX_MESSAGE_DEPTH):
        return _too_deep("headers")
    try:
        body = payload()
    except Exception:
        return None
    if not isinstance(body, list | tuple):
        return f"body: must be [args, kwargs, embed], not {type(body).__name__}"
    try:
        _body.validate_python(body)
    except ValidationError as exc:
        return f"body: must be [args, kwargs, embed] ({_describe_body_error(exc)})"
    if deeper_than(body, MAX_MESSAGE_DEPTH):
        return _too_deep("body")
    return None


def _too_deep(part: str) -> str:
    return (
        f"{part}: must be nested at most {MAX_MESSAGE_DEPTH} levels deep (objects and arrays; "
        "the worker's pool could not pickle it)"
    )


def _describe_body_error(error: ValidationError) -> str:
    """``part: rule`` for each problem, the parts of the body by name."""
    parts = []
    for item in error.errors(include_url=False):
        first = item["loc"][0] if item["loc"] else None
        where = BODY_PARTS[first] if isinstance(first, int) and first < len(BODY_PARTS) else "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _counted(reason: RefusalReason, refuse: Callable[..., None]) -> Callable[..., None]:
    """Celery's ``refuse`` method, counting each call as a refusal for ``reason``."""

    @functools.wraps(refuse)
    def counted(self: CeleryConsumer, *args: Any) -> None:
        metrics.record_refusal(reason)
        refuse(self, *args)

    return counted


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, refusing the task messages it would choke on, counting refusals."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            wrong = message_problem(message.headers, lambda: message.payload)
            if wrong is not None:
                return self.on_invalid_task(None, message, InvalidTaskError(wrong))
            return handle(message)

        return on_task_received

    # Celery's own refusals, each counted first (the message itself they log and reject).
    on_invalid_task = _counted("invalid_task_message", CeleryConsumer.on_invalid_task)
    on_decode_error = _counted("undecodable_body", CeleryConsumer.on_decode_error)
    on_unknown_task = _counted("unknown_task", CeleryConsumer.on_unknown_task)
    on_unknown_message = _counted("unknown_message", CeleryConsumer.on_unknown_message)
