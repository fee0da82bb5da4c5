"""``sessions dashboard``: the app served by uvicorn, on the loopback address by default."""

from __future__ import annotations

import ipaddress

import uvicorn

from sessions.dashboard.app import create_app
from sessions.settings import Settings


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
    try:
        uvicorn.Server(config).run()
    finally:
        app.state.store.dispose()
