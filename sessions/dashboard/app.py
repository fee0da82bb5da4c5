"""The dashboard's ASGI application: routes, templates, and how errors are shown.

Only ``GET`` (and with it ``HEAD``) routes exist, and the store it reads through is
opened read-only, so nothing the page does can write: a write would have to get past
the router (405) and then the database (which refuses it).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from sessions.dashboard import views
from sessions.dashboard.params import BadParameter
from sessions.dashboard.reads import open_read_only_store
from sessions.dashboard.security import NONCE_KEY, SecurityHeaders, TokenGate
from sessions.settings import Settings, get_settings, mask_url
from sessions.store import SessionStore

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: ``Host`` headers a dashboard without a token answers to. Without this check any web
#: page could read it through DNS rebinding (its own host name resolving to 127.0.0.1);
#: with a token such a page has nothing to present, so any host is accepted.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def create_app(settings: Settings | None = None, *, store: SessionStore | None = None) -> Starlette:
    """The dashboard over ``store`` (by default a read-only store on ``settings``' database)."""
    settings = settings or get_settings()
    store = store or open_read_only_store(settings)
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    templates = _templates()
    hosts = ["*"] if token else list(LOCAL_HOSTS)

    def unauthorized(request: Request) -> Response:
        response = _error_page(templates, request, 401, "This dashboard needs its token.")
        response.headers["WWW-Authenticate"] = 'Bearer realm="sessions dashboard"'
        return response

    app = Starlette(
        routes=[
            Route("/", views.overview, methods=["GET"], name="overview"),
            Route("/sessions", views.session_list, methods=["GET"], name="sessions"),
            Route("/session", views.session_detail, methods=["GET"], name="session"),
        ],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
            Middleware(SecurityHeaders),
            Middleware(TokenGate, token=token, unauthorized=unauthorized),
        ],
        exception_handlers={
            BadParameter: lambda request, exc: _error_page(templates, request, 400, str(exc)),
            HTTPException: lambda request, exc: _http_error(templates, request, exc),
            OperationalError: lambda request, exc: _database_error(templates, request, exc),
            ProgrammingError: lambda request, exc: _database_error(templates, request, exc),
        },
    )
    app.state.store = store
    app.state.templates = templates
    return app


def _templates() -> Jinja2Templates:
    # Strict: a misspelt name in a template fails its test instead of rendering blank.
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined
    )
    env.filters["num"] = lambda value: f"{int(value):,}"
    env.filters["money"] = lambda value: f"{float(value):,.4f}"
    env.filters["rate"] = lambda value: f"{float(value):.1%}"
    env.filters["ms"] = format_ms
    env.filters["when"] = format_when
    env.filters["json"] = lambda value: json.dumps(value, indent=2, sort_keys=True)
    env.filters["quote"] = lambda value: quote(str(value), safe="")
    env.globals["nonce_key"] = NONCE_KEY
    return Jinja2Templates(env=env)


def format_ms(seconds: float | None) -> str:
    """Seconds as milliseconds for people: ``-`` for no value, 1 decimal below 100 ms."""
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:,.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def format_when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _error_page(
    templates: Jinja2Templates, request: Request, status: int, message: str
) -> Response:
    return templates.TemplateResponse(
        request,
        "error.html",
        {"status": status, "message": message, "database": None, "generated_at": None},
        status_code=status,
    )


def _http_error(templates: Jinja2Templates, request: Request, exc: Any) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "No such page.", 405: "This dashboard only reads: use GET."}
    message = exc.detail if exc.status_code == 404 and exc.detail != "Not Found" else None
    response = _error_page(
        templates, request, exc.status_code, message or messages.get(exc.status_code, exc.detail)
    )
    response.headers.update(exc.headers or {})
    return response


def _database_error(templates: Jinja2Templates, request: Request, exc: Any) -> Response:
    store: SessionStore = request.app.state.store
    log.warning("dashboard read failed: %s", exc)
    text = str(getattr(exc, "orig", exc))
    if "no such table" in text or "does not exist" in text:
        message = f"The database at {mask_url(store.url)} has no schema yet."
    else:
        message = f"Cannot read the database at {mask_url(store.url)}."
    return _error_page(templates, request, 503, message)
