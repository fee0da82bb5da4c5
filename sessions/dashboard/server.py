"""``sessions dashboard``: the app served by uvicorn, on the loopback address by default."""

from __future__ import annotations

import ipaddress
import logging
import re

import uvicorn

from sessions.dashboard.app import create_app
from sessions.settings import Settings

#: ``token=...`` in a logged request line (a browser's first visit carries the token so).
TOKEN_IN_QUERY = re.compile(r"([?&])token=[^&\s]*")


class RedactToken(logging.Filter):
    """Masks the token in uvicorn's access log lines: a log must not hold the credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                TOKEN_IN_QUERY.sub(r"\1token=***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


class DashboardConfigError(ValueError):
    """The dashboard was asked to serve in a way that would expose the data unprotected."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the dashboard until interrupted.

    Raises :class:`DashboardConfigError` for a non-loopback ``host`` without a token:
    anyone who can reach the port would read every session.
    """
    host = host or settings.dashboard_host
    port = port or settings.dashboard_port
    if not is_loopback(host) and settings.dashboard_token is None:
        raise DashboardConfigError(
            f"binding the dashboard to {host} exposes it beyond this machine: "
            "set SESSIONS_DASHBOARD_TOKEN first"
        )
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, server_header=False, proxy_headers=False, log_level="info"
    )
    logging.getLogger("uvicorn.access").addFilter(RedactToken())
    try:
        uvicorn.Server(config).run()
    finally:
        app.state.store.dispose()
