"""The dashboard's pages: each validates its parameters, reads the store, renders a template.

Endpoints are plain functions, so Starlette runs them in its thread pool: the store's
reads are synchronous and must not block the event loop.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import get_args

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from sessions.dashboard.chart import chart, minutes_between
from sessions.dashboard.params import (
    OverviewParams,
    SessionListParams,
    SessionParams,
    TopBy,
    parse_query,
)
from sessions.dashboard.reads import by_status, health_counts, health_level
from sessions.records import STATUSES
from sessions.settings import mask_url
from sessions.store import SessionStore


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
    """``GET /``: sessions by status, the last minutes' activity, top users, and health."""
    params = parse_query(OverviewParams, request.query_params.multi_items())
    store = _store(request)
    now = datetime.now(UTC)
    minutes = minutes_between(now - timedelta(minutes=params.minutes - 1), now)
    activity = store.activity(minutes[0], now)
    unhealthy = store.unhealthy(limit=params.unhealthy)
    breakdown = by_status(store)
    return _render(
        request,
        "overview.html",
        {
            "params": params,
            "by_status": breakdown.by_status,
            "total": breakdown.total,
            "events_chart": chart(
                "events per minute", "bars", minutes, {a.minute: a.events for a in activity}
            ),
            "active_chart": chart(
                "active sessions", "line", minutes, {a.minute: a.active_sessions for a in activity}
            ),
            "top_users": store.top_users(by=params.by, limit=params.top),
            "rankings": get_args(TopBy),
            "health": health_counts(store),
            "unhealthy": [(record, health_level(record, store.settings)) for record in unhealthy],
        },
    )


def session_list(request: Request) -> Response:
    """``GET /sessions``: a page of sessions by id, filtered by user and status."""
    params = parse_query(SessionListParams, request.query_params.multi_items())
    store = _store(request)
    records = store.list_sessions(
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
