"""A queue item that is not a kombu message is set aside, and the worker goes on.

The fault (Celery 5.7.0 with kombu 5.7.0; kombu's code is the same since kombu 4): kombu's
virtual transports turn each queue item into its *envelope* (a JSON object: body,
content type, headers, properties) in the worker's main process, inside the consumer's event
loop, before Celery sees a message. The Redis transport parses it in ``Channel._brpop_read``
and ``Channel._get`` (``loads(bytes_to_str(item))``), the filesystem transport in
``Channel._get``; then the callback of ``Channel.basic_consume`` builds the ``Message``
(``payload['properties']``, ``properties['delivery_tag']``, ``decode_body`` with the
envelope's ``body_encoding``) and Redis's ``QoS.append`` reads
``delivery_info['exchange']``. Whatever that raises (``JSONDecodeError`` for an item that is
not JSON, ``TypeError`` for JSON that is not an object, ``AttributeError`` for a body
encoding kombu does not know, ``binascii.Error`` for a body that is not base64, ...)
happens outside Celery's ``on_decode_error``, which only covers the body of a message
already built: the worker logs ``Unrecoverable error`` and exits, and an error the Redis
transport counts as a connection error (``KeyError`` for a missing field) makes it drop the
item and reconnect. ``redis-cli LPUSH sessions.events "this is not json {"`` was enough, and
the item, already taken off the queue, was gone too. Reported upstream for the Redis
transport as celery/celery#1113 (2012; closed unreproduced, the parse is the same in 5.7.0)
and for SQS as celery/kombu#2421 (open since November 2025); kombu's SQS transport wraps a
foreign JSON body into an envelope (celery/kombu#581, #1306), the others do not.

The repair, :func:`install`:

* the Redis and filesystem transports' ``loads`` returns an :class:`Unreadable` for text that
  is not JSON, or is JSON nested too deeply for Python's decoder (``RecursionError``: a
  ``[`` repeated some thousand times, or an envelope whose headers are), instead of raising.
  Only a delivery looks inside it; kombu's other uses of that
  ``loads`` (its own bookkeeping: unacknowledged messages kept in Redis, the filesystem's
  exchange tables) unpack what it returns, and unpacking an :class:`Unreadable` raises the
  JSON error, exactly as before;
* ``Transport._deliver`` of the virtual transports, through which every item reaches its
  consumer, checks the envelope first: every field kombu and Celery read on the way, with
  the types they need, and that the body decodes with its encoding. A readable envelope goes
  on to kombu's own method untouched. Any other item is handed to the ``replace`` function
  given to :func:`install`, which returns an envelope to deliver in its place or ``None`` to
  drop it (logged at ERROR). The worker's (``sessions.worker.celery_app``) replaces an item of the
  pipeline's queues with a ``sessions.set_aside`` task carrying the item's text (its first
  :data:`KEPT_BYTES`) and what is wrong with it, which the pool writes to ``dead_letters``;
  an item of another queue (Celery's control channel) is dropped, as kombu itself drops an
  undecodable message there.

The replacement is an ordinary task message: it is acknowledged once its dead letter is
written (``acks_late``) and comes back if the worker dies first, like any other.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from kombu.serialization import dumps
from kombu.transport import filesystem as kombu_filesystem
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as kombu_virtual
from kombu.utils.uuid import uuid
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from sessions.decoding import describe_error
from sessions.store import MAX_DEAD_LETTER_BYTES

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: The transports whose module-level ``loads`` parses their queue items.
PARSING_MODULES = (kombu_redis, kombu_filesystem)
#: How much of an unreadable item is carried to its dead letter (the store keeps no more).
KEPT_BYTES = MAX_DEAD_LETTER_BYTES
#: What JSON calls the Python types ``loads`` makes.
_JSON_TYPES: dict[type, str] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
#: Marks kombu's functions once wrapped, so that installing twice wraps them once.
_WRAPPED = "_sessions_envelope_guard"

#: ``replace(text, reason, queue)``: the envelope to deliver instead of an unreadable item of
#: ``queue``, or ``None`` to drop it.
Replace = Callable[[str, str, str], dict[str, Any] | None]


class Unreadable:
    """What the transports' ``loads`` returns for text that is not JSON.

    ``text`` is the item (bytes decoded as kombu does, invalid UTF-8 replaced), ``error``
    the JSON error. Unpacking or iterating it raises that error: kombu's own uses of ``loads``
    unpack what it returns, and so fail as they did before :func:`install`.
    """

    __slots__ = ("error", "text")

    def __init__(self, text: str, error: ValueError | RecursionError) -> None:
        self.text = text
        self.error = error

    def __iter__(self) -> Any:
        raise self.error

    def __repr__(self) -> str:
        return f"Unreadable({self.text[:80]!r}, {self.error})"


class DeliveryInfo(BaseModel):
    """Where the message was published to; Redis keeps both with an unacknowledged message."""

    model_config = ConfigDict(extra="allow")
    exchange: StrictStr | None
    routing_key: StrictStr | None


class Properties(BaseModel):
    model_config = ConfigDict(extra="allow")
    delivery_tag: StrictStr
    body_encoding: StrictStr | None = None
    delivery_info: DeliveryInfo


class Envelope(BaseModel):
    """A kombu virtual transport's message as it lies in the queue: what kombu and Celery
    read of it before the body is decoded, with the types they need."""

    model_config = ConfigDict(extra="allow")
    body: StrictStr | None = None
    content_type: StrictStr | None = Field(None, alias="content-type")
    content_encoding: StrictStr | None = Field(None, alias="content-encoding")
    headers: dict[StrictStr, Any] | None = None
    properties: Properties


def tolerant(parse: Callable[..., Any]) -> Callable[..., Any]:
    """``parse`` (a transport's ``loads``), returning an :class:`Unreadable` for text that is
    not JSON, or too deep for the decoder, instead of raising."""

    @functools.wraps(parse)
    def loads(text: str | bytes, **options: Any) -> Any:
        try:
            return parse(text, **options)
        # JSONDecodeError, UnicodeDecodeError for bytes; RecursionError for deep nesting
        except (ValueError, RecursionError) as exc:
            readable = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
            return Unreadable(readable, exc)

    return _marked(loads)


def problem(payload: Any, codecs: Mapping[str, Any]) -> str | None:
    """What stops ``payload`` (an item as a transport parsed it) being delivered as a
    message, on a channel decoding bodies with ``codecs`` (kombu's ``Channel.codecs``: by
    name, each with a ``decode``); ``None`` if nothing does."""
    if isinstance(payload, Unreadable):
        if isinstance(payload.error, RecursionError):
            return f"not JSON Python can decode: nested too deeply ({payload.error})"
        return f"not JSON ({payload.error})"
    if not isinstance(payload, dict):
        return f"a JSON {_JSON_TYPES.get(type(payload), 'value')}, not an object"
    try:
        envelope = Envelope.model_validate(payload)
    except ValidationError as exc:
        return describe_error(exc)
    encoding = envelope.properties.body_encoding
    if envelope.body and encoding and encoding.lower() != "utf-8":
        codec = codecs.get(encoding)
        if codec is None:
            return f"properties.body_encoding: {encoding!r} is none kombu knows"
        try:
            codec.decode(envelope.body)
        except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            return f"body: not {encoding} ({exc})"
    return None


def text_of(payload: Any) -> str:
    """The item as text, for its dead letter and the log."""
    if isinstance(payload, Unreadable):
        return payload.text
    try:
        return json.dumps(payload, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return repr(payload)


def cut(text: str, limit: int = KEPT_BYTES) -> str:
    """``text`` if it has at most ``limit`` bytes of UTF-8; else its start, saying so."""
    encoded = text.encode("utf-8", "backslashreplace")
    if len(encoded) <= limit:
        return text
    start = encoded[:limit].decode("utf-8", "ignore")
    return f"{start}... [cut at {limit} of {len(encoded)} bytes]"


def set_aside_as_task(app: Celery, task: str, queues: Collection[str]) -> Replace:
    """A ``replace`` for :func:`install`: an unreadable item of one of ``queues`` becomes a
    call of ``task`` (by name) with the item's text (cut to :data:`KEPT_BYTES`) and the
    reason; an item of any other queue is dropped (``None``).

    The replacement is the envelope kombu's own publish would make of that call, with a
    fresh delivery tag and the body as plain UTF-8 (which every channel reads as it is).
    """

    def replace(text: str, reason: str, queue: str) -> dict[str, Any] | None:
        if queue not in queues:
            return None
        task_id = uuid()
        size = len(text.encode("utf-8", "backslashreplace"))
        why = f"unreadable message on {queue} ({size} bytes): {reason}"
        message = app.amqp.as_task_v2(task_id, task, args=(cut(text), why), kwargs={})
        content_type, content_encoding, body = dumps(message.body, serializer="json")  # type: ignore[no-untyped-call]
        return {
            "body": body,
            "content-type": content_type,
            "content-encoding": content_encoding,
            "headers": message.headers,
            "properties": {
                **message.properties,
                "delivery_mode": 2,
                "priority": 0,
                "body_encoding": "utf-8",
                "delivery_tag": uuid(),
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }

    return replace


def install(replace: Replace) -> None:
    """Make the virtual transports set aside what they cannot read (idempotent, process-wide).

    ``replace`` is asked for the envelope to deliver in place of each unreadable item; a
    ``replace`` that raises is logged and the item dropped: nothing here may stop the
    consumer. Installing again keeps the first ``replace``.
    """
    for module in PARSING_MODULES:
        if not getattr(module.loads, _WRAPPED, False):
            module.loads = tolerant(module.loads)  # type: ignore[attr-defined]
    original = kombu_virtual.Transport._deliver
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def _deliver(self: kombu_virtual.Transport, message: Any, queue: str) -> Any:
        wrong = problem(message, self.Channel.codecs)
        if wrong is None:
            return original(self, message, queue)  # type: ignore[no-untyped-call]
        text = text_of(message)
        try:
            replacement = replace(text, wrong, queue)
        except Exception:
            log.exception("could not set aside an unreadable message on %s; dropped", queue)
            return None
        if replacement is None:
            log.error(
                "dropped an unreadable message on %s: %s: %r (%d characters)",
                queue,
                wrong,
                text[:200],
                len(text),
            )
            return None
        log.error("an unreadable message on %s is set aside: %s", queue, wrong)
        return original(self, replacement, queue)  # type: ignore[no-untyped-call]

    kombu_virtual.Transport._deliver = _marked(_deliver)  # type: ignore[method-assign]


def installed() -> bool:
    """Whether :func:`install` is in force in this process."""
    return all(getattr(m.loads, _WRAPPED, False) for m in PARSING_MODULES) and bool(
        getattr(kombu_virtual.Transport._deliver, _WRAPPED, False)
    )


def _marked(function: Callable[..., Any]) -> Callable[..., Any]:
    setattr(function, _WRAPPED, True)
    return function
