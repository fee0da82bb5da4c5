"""The rules an event's fields obey, in the standard library only.

One place for each rule: the event models (:mod:`sessions.events`) validate with these
functions, and the client (:mod:`sessions.plain`) checks plainly valid arguments with them
without building a model, so that an agent that records never imports pydantic
(README, "Agent start-up"). Each ``check_*`` returns the value as accepted or raises
:class:`ValueError` with the rule in words; the model adds the field's name.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

#: Session and user ids: printable ASCII without whitespace, as in ``user-456-device-789``.
ID_PATTERN = re.compile(r"[!-~]{1,255}")
#: Longest accepted processing time for one request (one day).
MAX_PROCESSING_TIME = 86_400.0
#: Largest accepted cost of one request: far above any real one, and small enough that no
#: sum of them in a session can overflow to infinity.
MAX_COST = 1e9
#: Largest accepted token count of one request, in or out: far above any model's context
#: window (the largest hold about 10**7 tokens), and small enough that a session's sum stays
#: within a BIGINT for more than 9 * 10**9 such requests (as ``MAX_COST`` keeps cost finite).
MAX_TOKENS = 10**9
#: Largest accepted metadata object, serialized as compact JSON.
MAX_METADATA_BYTES = 16 * 1024
#: Deepest accepted nesting of objects and arrays in metadata, the metadata object itself
#: being level 1: ample for structured metadata, far below the depths at which pydantic's
#: serializer (255) and Python's JSON codec (about 990: the recursion limit) give up.
MAX_METADATA_DEPTH = 32
#: How far in the future an event's ``at`` may lie (producer clocks drift a little).
MAX_CLOCK_SKEW = timedelta(minutes=5)
#: The earliest accepted ``at``: before any agent recorded a session, and a time every
#: database and every timezone offset can represent (year 1 plus an offset cannot be).
MIN_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)
#: The states an ``end`` event may put a session in.
EndStatus = Literal["completed", "failed", "expired"]
END_STATUSES: frozenset[str] = frozenset(get_args(EndStatus))


#: Ids that passed :func:`check_id` lately, each with its JSON form: agents record into the
#: same few sessions over and over, and a lookup costs a fraction of the pattern match
#: (bounded: forgotten all at once when full).
valid_ids: dict[str, str] = {}
VALID_IDS_REMEMBERED = 8192


def check_id(value: str) -> str:
    """``value`` if it is a session or user id (:data:`ID_PATTERN`); remembered in
    :data:`valid_ids` if it is a ``str`` itself (a subclass could hash or compare as another id)."""
    if value in valid_ids:
        return value
    if not ID_PATTERN.fullmatch(value):
        raise ValueError("must be 1 to 255 printable ASCII characters without whitespace")
    if type(value) is str:
        if len(valid_ids) >= VALID_IDS_REMEMBERED:
            valid_ids.clear()
        valid_ids[value] = json.dumps(value)
    return value


#: A past value of ``now + MAX_CLOCK_SKEW``. The true limit only grows, so a time at or
#: before this one is certainly accepted; only a later one pays for reading the clock.
_at_limit = datetime.min.replace(tzinfo=UTC)


_TOO_EARLY = f"must not lie before {MIN_EVENT_TIME:%Y-%m-%dT%H:%M:%SZ}"
_TOO_LATE = "must not lie more than 5 minutes in the future"


def check_at(value: datetime) -> datetime:
    global _at_limit
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00: no year 0 to normalise to
            early = value.year < MIN_EVENT_TIME.year
            raise ValueError(_TOO_EARLY if early else _TOO_LATE) from None
    if value < MIN_EVENT_TIME:
        raise ValueError(_TOO_EARLY)
    if value > _at_limit:
        _at_limit = datetime.now(UTC) + MAX_CLOCK_SKEW
        if value > _at_limit:
            raise ValueError(_TOO_LATE)
    return value


def check_processing_time(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_PROCESSING_TIME:
        raise ValueError(f"must be a finite number of seconds from 0 to {MAX_PROCESSING_TIME:g}")
    return value


def check_cost(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_COST:
        raise ValueError(f"must be a finite number from 0 to {MAX_COST:g}")
    return value


def refuse_numbers(value: Any) -> Any:
    """An event time is ISO 8601 text or a datetime: a bare number is ambiguous (seconds or
    milliseconds since when?) and is refused rather than guessed."""
    if isinstance(value, int | float):
        raise ValueError("must be an ISO 8601 date-time with a timezone, not a number")
    return value


def text_problem(text: str) -> str | None:
    """What keeps ``text`` out of a JSON document every database stores, if anything."""
    if "\x00" in text:
        return "must not contain a NUL character (\\x00: PostgreSQL cannot store it in JSON)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return (
                "must not contain a lone surrogate (such as \\udcff from a surrogate-escaped "
                "file name: it is no Unicode character, and JSON text cannot carry it)"
            )
    return None


#: Where a value sits in metadata, for an error message: ``(parent, key)`` links, formatted
#: only when something is refused (most metadata is refused by nothing).
_Where = tuple["_Where", Any] | None


def _place(where: _Where) -> str:
    keys: list[Any] = []
    while where is not None:
        where, key = where
        keys.append(key)
    return "metadata" + "".join(f"[{key!r}]" for key in reversed(keys))


def metadata_problem(metadata: dict[str, Any]) -> str | None:
    """Why ``metadata`` cannot be stored as it is, or ``None``: nested deeper than
    :data:`MAX_METADATA_DEPTH`, or holding text no JSON document can (:func:`text_problem`).

    A loop over an explicit stack, not recursion: a deep (or cyclic) object must cost a
    refusal, not a ``RecursionError``; it stops at the first level beyond the bound.
    """
    stack: list[tuple[Any, int, _Where]] = [(metadata, 1, None)]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return f"{problem} (at {_place(where)})"
            continue
        if not isinstance(value, dict | list | tuple):
            continue
        if depth > MAX_METADATA_DEPTH:
            return (
                f"must be nested at most {MAX_METADATA_DEPTH} levels deep (objects and arrays, "
                f"counting the metadata object; deeper at {_place(where)})"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    return f"{problem} (in a key of {_place(where)})"
                stack.append((item, depth + 1, (where, key)))
        else:
            stack.extend((item, depth + 1, (where, index)) for index, item in enumerate(value))
    return None


def check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as checked, a copy of its own: read back from the JSON text it was measured
    by, so that a caller changing its dict (or a list in it) afterwards cannot change what was
    accepted, nor slip past these rules before the event is sent; tuples become lists and
    keys text, as the wire carries them."""
    problem = metadata_problem(value)
    if problem:
        raise ValueError(problem)
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be a JSON object ({exc})") from None
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON (got {size})")
    frozen: dict[str, Any] = json.loads(text)
    return frozen


#: A UUID in its canonical, hyphenated form, as the wire contract asks for the ids a producer
#: makes (the validator also reads other forms, which producers should not rely on).
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
#: An RFC 3339 date-time with an offset, as the wire contract asks for ``at`` (the validator
#: also reads other ISO 8601 forms, which producers in other languages should not rely on).
RFC3339_PATTERN = (
    r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]"
    r":[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)


#: Longest message content, in bytes of UTF-8 (an LLM answer of some 16,000 tokens).
MAX_MESSAGE_BYTES = 64 * 1024
#: Message roles: ``user``, ``assistant``, ``system``, ``tool`` and the like.
ROLE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
#: Largest message sequence number (a signed 64-bit column).
MAX_SEQ = 2**63 - 1


def check_role(value: str) -> str:
    if not ROLE_PATTERN.fullmatch(value):
        raise ValueError("must be 1 to 32 lowercase letters, digits, '_' or '-', from a letter")
    return value


def check_storable(text: str, max_bytes: int, form: str, nul: str = "\x00") -> str:
    """``text`` if a database text (or JSON) column can take it: no ``nul`` (NUL, or its
    JSON escape), no lone surrogate, at most ``max_bytes`` as UTF-8 (``form`` names how
    it is measured); else :class:`ValueError` naming the rule, so that it is refused here
    rather than dead-lettered by the worker."""
    if nul in text:
        raise ValueError("must not contain NUL characters")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    if size > max_bytes:
        raise ValueError(f"must be at most {max_bytes} bytes {form} (got {size})")
    return text


def check_content(value: str) -> str:
    return check_storable(value, MAX_MESSAGE_BYTES, "as UTF-8")
