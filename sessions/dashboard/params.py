"""The dashboard's query parameters, as pydantic models: bad input becomes one clear 400.

Every page validates its whole query string against one model before it reads anything.
Unknown parameters and repeated ones are refused too, so a typo (``?limt=5``) says so
instead of silently showing the default page. Numbers are whole numbers in the digits 0-9
and nothing else: Python's ``int()`` (and pydantic's lax mode) would read ``1_0`` as 10 and
accept ``+5``, `` 5``, ``5.0``.
"""

from __future__ import annotations

import re
from typing import Annotated, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from sessions.records import Status, UserRanking
from sessions.rules import ID_PATTERN

#: Query parameters the authentication layer consumes; no page model sees them.
RESERVED = frozenset({"token"})
#: A session or user id as the events model allows it: 1-255 printable ASCII, no spaces.
Id = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN.pattern}$")]
#: What the top-users table can be ordered by: what ``store.top_users`` ranks by.
TopBy = UserRanking

#: Longest name or value an error message repeats before it cuts it with ``...``.
SHOWN = 40
#: Most digits a number may have (no parameter needs more; ``int()`` refuses over 4,300).
MAX_DIGITS = 18
_DIGITS = re.compile(r"[0-9]+")

M = TypeVar("M", bound="PageParams")


def _whole_number(value: object) -> object:
    """A query value as a whole number, written in ASCII digits only."""
    if not isinstance(value, str):
        return value  # a default, or a test passing a number: the int schema checks it
    if _DIGITS.fullmatch(value) is None:
        raise PydanticCustomError("int_digits", "Input should be a valid integer in the digits 0-9")
    if len(value.lstrip("0")) > MAX_DIGITS:
        raise PydanticCustomError("int_digits", f"Input should have at most {MAX_DIGITS} digits")
    return int(value)


#: A count or size given in the query string (bounded by each field's ``Field``).
Count = Annotated[int, BeforeValidator(_whole_number)]


class BadParameter(ValueError):
    """A query parameter broke its rule; the message names both and becomes a 400."""


class PageParams(BaseModel):
    """Base of the page models: frozen, and unknown parameters are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class OverviewParams(PageParams):
    """``GET /``: the fleet at a glance."""

    #: Minutes of activity the chart covers, ending now.
    minutes: Count = Field(60, ge=5, le=1440)
    #: Rows of the top-users table.
    top: Count = Field(10, ge=1, le=100)
    #: Order of the top-users table.
    by: TopBy = "requests"
    #: Rows of the health list (the counts above it are always complete).
    unhealthy: Count = Field(20, ge=1, le=500)


class SessionListParams(PageParams):
    """``GET /sessions``: one page of sessions by id, optionally one user's or one status's."""

    user: Id | None = None
    status: Status | None = None
    #: Keyset cursor: the last session id of the previous page.
    after: Id | None = None
    limit: Count = Field(50, ge=1, le=500)


def parse_query(model: type[M], items: list[tuple[str, str]]) -> M:
    """Validate a query string's ``(name, value)`` pairs against ``model``.

    Raises :class:`BadParameter` naming the parameter and the rule it broke.
    """
    values: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in items:
        if name in RESERVED:
            continue
        if name in seen:
            raise BadParameter(f"query parameter '{name}': given more than once")
        seen.add(name)
        if value == "" and name in model.model_fields:
            continue  # an empty form field means "any", as if it were not sent
        values[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BadParameter(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """Every error of ``exc`` as ``query parameter 'x': rule (got 'value')``, joined by ``; ``."""
    messages = []
    for error in exc.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"])
        # A parameter may have an empty name (``?=1``): it is named, not called 'query'.
        label = f"query parameter '{_cut(name)}'" + ("" if name else " (no name)")
        if error["type"] in ("extra_forbidden", "missing"):
            problem = "unknown parameter" if error["type"] == "extra_forbidden" else "required"
            messages.append(f"{label}: {problem}")
            continue
        rule = error["msg"][:1].lower() + error["msg"][1:]
        if error["type"] == "string_pattern_mismatch":
            rule = "must be 1 to 255 printable ASCII characters without spaces"
        messages.append(f"{label}: {rule} (got {_cut(str(error['input']))!r})")
    return "; ".join(messages)


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


class SessionParams(PageParams):
    """``GET /session?id=...``: one session.

    The id is a query parameter, not a path segment: ids may hold ``/``, ``%`` and ``?``,
    and a query value is decoded exactly once, where path routing decodes some twice.
    """

    id: Id
