"""Who may see the dashboard, and what a browser may do with its pages.

The optional token (``SESSIONS_DASHBOARD_TOKEN``) is checked before any route runs, so
404s and 405s reveal nothing either. Scripts send ``Authorization: Bearer <token>``. A
browser cannot send that header from its address bar, so it opens ``/?token=<token>`` once:
the gate answers with a redirect to the same address without the token (it does not stay
in the history or in a referrer) and an HttpOnly, SameSite=Strict cookie.

The cookie holds its issue time and an HMAC of that time keyed by the token, not the token
itself; the server refuses it :data:`COOKIE_MAX_AGE` after it was issued, whatever the
browser keeps, and as soon as the token changes. The redirect goes only to a path of this
server (:func:`local_target`): the request's path cannot make it an address elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The cookie a browser keeps after presenting the token once.
COOKIE = "sessions_dashboard"
#: How long that cookie lasts, in seconds (a working day): the browser's Max-Age, and the
#: server's limit on the issue time signed into it.
COOKIE_MAX_AGE = 12 * 3600
#: How far in the future an issue time may be (clocks of several dashboard processes).
CLOCK_SKEW = 60
#: The query parameter a browser presents the token in.
TOKEN_PARAMETER = "token"
#: Scope ``state`` key of the per-response nonce that lets the page's inline CSS run.
NONCE_KEY = "csp_nonce"
#: A cookie's issue time: Unix seconds, digits only.
_ISSUED = re.compile(r"[0-9]{1,12}")


def cookie_value(token: str, issued: int) -> str:
    """What the cookie holds: ``<issued>.<HMAC-SHA256(token, issued)>``.

    ``issued`` is the Unix time (seconds) it was issued at. The value is useless as a
    bearer token, and does not reveal the token.
    """
    message = f"sessions-dashboard-cookie:{issued}".encode()
    signature = hmac.new(token.encode(), message, hashlib.sha256).hexdigest()
    return f"{issued}.{signature}"


def cookie_is_valid(value: str, token: str, now: float) -> bool:
    """Whether ``value`` is a cookie :func:`cookie_value` made for ``token`` that is not too old.

    Valid from its issue time (up to :data:`CLOCK_SKEW` seconds ahead of ``now``) for
    :data:`COOKIE_MAX_AGE` seconds; the signature is compared in constant time.
    """
    issued, dot, _ = value.partition(".")
    if not dot or _ISSUED.fullmatch(issued) is None:
        return False
    if not _same(value, cookie_value(token, int(issued))):
        return False
    return -CLOCK_SKEW <= now - int(issued) < COOKIE_MAX_AGE


def local_target(path: str, query: str = "") -> str:
    """A redirect target that can only be a path of this server: ``path`` (decoded) and ``query``.

    Every character a browser could read as the start of another address is encoded or
    dropped: backslashes, control characters, spaces and ``%`` are percent-encoded (a browser
    reads ``/\\evil`` as ``//evil``), and leading slashes collapse to one (``//evil.example/``,
    and ``/%2F%2Fevil``, whose path decodes to ``///evil``, would name another host).
    """
    target = "/" + quote(path, safe="/").lstrip("/")
    return f"{target}?{query}" if query else target


class TokenGate:
    """ASGI middleware: with a token configured, every request must present it.

    ``clock`` gives the time in Unix seconds (tests pass their own).
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str | None,
        unauthorized: Callable[[Request], Response],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.token = token
        self.unauthorized = unauthorized
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        # Starlette decodes the names, so ?%74oken= is the token parameter too.
        presented = request.query_params.getlist(TOKEN_PARAMETER)
        if presented:
            # The token in the address is only ever a login: a valid one is taken out of the
            # address by the redirect, an invalid one is refused even with a valid cookie.
            if len(presented) == 1 and _same(presented[0], self.token):
                await self._remember(request)(scope, receive, send)
            else:
                await self.unauthorized(request)(scope, receive, send)
            return
        if self._bearer(request) or self._cookie(request):
            await self.app(scope, receive, send)
            return
        await self.unauthorized(request)(scope, receive, send)

    def _bearer(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and _same(credentials.strip(), self.token or "")

    def _cookie(self, request: Request) -> bool:
        value = request.cookies.get(COOKIE, "")
        return bool(value) and cookie_is_valid(value, self.token or "", self.clock())

    def _remember(self, request: Request) -> Response:
        """Set the cookie and send the browser to the same address without the token."""
        query = urlencode(
            [(k, v) for k, v in request.query_params.multi_items() if k != TOKEN_PARAMETER]
        )
        target = local_target(request.scope["path"], query)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            cookie_value(self.token or "", int(self.clock())),
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
