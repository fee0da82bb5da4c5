"""Who may see the dashboard, and what a browser may do with its pages.

The optional token (``SESSIONS_DASHBOARD_TOKEN``) is checked before any route runs, so
404s and 405s reveal nothing either. Scripts send ``Authorization: Bearer <token>``. A
browser cannot send that header from its address bar, so it opens ``/?token=<token>`` once:
the gate answers with a redirect to the same address without the token (it does not stay
in the history or in a referrer) and an HttpOnly, SameSite=Strict cookie. The cookie holds
an HMAC of the token, not the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from urllib.parse import urlencode

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The cookie a browser keeps after presenting the token once.
COOKIE = "sessions_dashboard"
#: How long that cookie lasts, in seconds (a working day).
COOKIE_MAX_AGE = 12 * 3600
#: Scope ``state`` key of the per-response nonce that lets the page's inline CSS run.
NONCE_KEY = "csp_nonce"


def cookie_value(token: str) -> str:
    """What the cookie holds: derived from the token, useless as a bearer token itself."""
    return hmac.new(token.encode(), b"sessions-dashboard-cookie", hashlib.sha256).hexdigest()


class TokenGate:
    """ASGI middleware: with a token configured, every request must present it."""

    def __init__(
        self, app: ASGIApp, token: str | None, unauthorized: Callable[[Request], Response]
    ) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_value(token) if token else None
        self.unauthorized = unauthorized

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self._bearer(request) or self._cookie(request):
            await self.app(scope, receive, send)
            return
        presented = request.query_params.get("token")
        if presented is not None and _same(presented, self.token):
            await self._remember(request)(scope, receive, send)
            return
        await self.unauthorized(request)(scope, receive, send)

    def _bearer(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and _same(credentials.strip(), self.token or "")

    def _cookie(self, request: Request) -> bool:
        return _same(request.cookies.get(COOKIE, ""), self.cookie or "")

    def _remember(self, request: Request) -> Response:
        """Set the cookie and send the browser to the same address without the token."""
        query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        target = URL(path=request.url.path, query=query)
        response = RedirectResponse(str(target), status_code=303)
        response.set_cookie(
            COOKIE,
            self.cookie or "",
            max_age=COOKIE_MAX_AGE,
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response


def _same(presented: str, expected: str) -> bool:
    """Constant-time comparison; an empty expectation matches nothing."""
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


class SecurityHeaders:
    """ASGI middleware: no caching, no framing, no scripts, and inline CSS only by nonce.

    The page is plain HTML with an SVG chart, so its Content-Security-Policy allows no
    script at all; the one inline ``<style>`` carries the nonce made here for each response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})[NONCE_KEY] = nonce
        policy = (
            "default-src 'none'; "
            f"style-src 'nonce-{nonce}'; "
            "img-src 'self' data:; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )
        extra = [
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cache-control", b"no-store"),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
