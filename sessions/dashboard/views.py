"""The dashboard's pages: each validates its parameters, reads the store, renders a template.

Endpoints are plain functions, so Starlette runs them in its thread pool: the store's
reads are synchronous and must not block the event loop.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import get_args

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from sessions.dashboard.params import (
    OverviewParams,
    SessionListParams,
    SessionParams,
    parse_query,
)
from sessions.dashboard.reads import health_counts, health_level
from sessions.records import Status
from sessions.settings import mask_url
from sessions.store import SessionStore

#: Every status, in the order the page lists them.
STATUSES: tuple[Status, ...] = get_args(Status)


def _store(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.store
    return store


def _templates(request: Request) -> Jinja2Templates:
    templates: Jinja2Templates = request.app.state.templates
    return templates


def _render(request: Request, name: str, context: dict[str, object]) -> Response:
    store = _store(request)
    common = {
        "database": mask_url(store.url),
        "generated_at": datetime.now(UTC),
        "settings": store.settings,
    }
    return _templates(request).TemplateResponse(request, name, {**common, **context})


def overview(request: Request) -> Response:
    """``GET /``: sessions by status, health, and the fleet's totals."""
    params = parse_query(OverviewParams, request.query_params.multi_items())
    store = _store(request)
    by_status = {status: store.aggregate(status=status) for status in STATUSES}
    unhealthy = store.unhealthy(limit=params.unhealthy)
    return _render(
        request,
        "overview.html",
        {
            "params": params,
            "by_status": by_status,
            "total": store.aggregate(),
            "health": health_counts(store),
            "unhealthy": [(record, health_level(record, store.settings)) for record in unhealthy],
        },
    )


def session_list(request: Request) -> Response:
    """``GET /sessions``: a page of sessions by id, filtered by user and status."""
    params = parse_query(SessionListParams, request.query_params.multi_items())
    store = _store(request)
    records = store.list(
        user_id=params.user, status=params.status, limit=params.limit, after=params.after
    )
    user_total = store.aggregate(user_id=params.user) if params.user is not None else None
    return _render(
        request,
        "sessions.html",
        {
            "params": params,
            "records": records,
            "statuses": STATUSES,
            "next_after": records[-1].session_id if len(records) == params.limit else None,
            "user_total": user_total,
        },
    )


def session_detail(request: Request) -> Response:
    """``GET /session?id=...``: every field of one session (its live run)."""
    params = parse_query(SessionParams, request.query_params.multi_items())
    store = _store(request)
    record = store.get(params.id)
    if record is None:
        raise HTTPException(404, f"no session {params.id!r}")
    user_total = store.aggregate(user_id=record.user_id) if record.user_id else None
    return _render(
        request,
        "session.html",
        {
            "record": record,
            "level": health_level(record, store.settings),
            "user_total": user_total,
        },
    )
