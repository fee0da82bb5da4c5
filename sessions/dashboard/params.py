"""The dashboard's query parameters, as pydantic models: bad input becomes one clear 400.

Every page validates its whole query string against one model before it reads anything.
Unknown parameters and repeated ones are refused too, so a typo (``?limt=5``) says so
instead of silently showing the default page.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sessions.events import ID_PATTERN
from sessions.records import Status, UserRanking

#: Query parameters the authentication layer consumes; no page model sees them.
RESERVED = frozenset({"token"})
#: A session or user id as the events model allows it: 1-255 printable ASCII, no spaces.
Id = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN.pattern}$")]
#: What the top-users table can be ordered by: what ``store.top_users`` ranks by.
TopBy = UserRanking

M = TypeVar("M", bound="PageParams")


class BadParameter(ValueError):
    """A query parameter broke its rule; the message names both and becomes a 400."""


class PageParams(BaseModel):
    """Base of the page models: frozen, and unknown parameters are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class OverviewParams(PageParams):
    """``GET /``: the fleet at a glance."""

    #: Minutes of activity the chart covers, ending now.
    minutes: int = Field(60, ge=5, le=1440)
    #: Rows of the top-users table.
    top: int = Field(10, ge=1, le=100)
    #: Order of the top-users table.
    by: TopBy = "requests"
    #: Rows of the health list (the counts above it are always complete).
    unhealthy: int = Field(20, ge=1, le=500)


class SessionListParams(PageParams):
    """``GET /sessions``: one page of sessions by id, optionally one user's or one status's."""

    user: Id | None = None
    status: Status | None = None
    #: Keyset cursor: the last session id of the previous page.
    after: Id | None = None
    limit: int = Field(50, ge=1, le=500)


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
        name = ".".join(str(part) for part in error["loc"]) or "query"
        if error["type"] in ("extra_forbidden", "missing"):
            problem = "unknown parameter" if error["type"] == "extra_forbidden" else "required"
            messages.append(f"query parameter '{name}': {problem}")
            continue
        rule = error["msg"][:1].lower() + error["msg"][1:]
        if error["type"] == "string_pattern_mismatch":
            rule = "must be 1 to 255 printable ASCII characters without spaces"
        shown = str(error["input"])
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        messages.append(f"query parameter '{name}': {rule} (got {shown!r})")
    return "; ".join(messages)


class SessionParams(PageParams):
    """``GET /session?id=...``: one session.

    The id is a query parameter, not a path segment: ids may hold ``/``, ``%`` and ``?``,
    and a query value is decoded exactly once, where path routing decodes some twice.
    """

    id: Id
