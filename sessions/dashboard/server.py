"""``sessions dashboard``: the app served by uvicorn, on the loopback address by default."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from sessions.dashboard.app import create_app
from sessions.redact import mask_target
from sessions.settings import Settings

#: Ports ``serve`` takes; 0 asks the system for a free one (uvicorn logs which).
PORTS = range(0, 65536)


class RedactToken(logging.Filter):
    """Masks secrets in uvicorn's access log lines: a log must not hold the credential.

    Each text argument (the request line's target) goes through
    :func:`~sessions.redact.mask_target`: ``token=`` and other secret parameters in any
    encoding (``?%74oken=``), and ``token`` itself wherever it appears, are masked.
    """

    def __init__(self, token: str | None = None) -> None:
        super().__init__()
        self.secrets = [token] if token else []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                mask_target(arg, self.secrets) if isinstance(arg, str) else arg
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

    ``host`` and ``port`` default to the settings' (``None``); port 0 is any free port.
    Raises :class:`DashboardConfigError` for a non-loopback ``host`` without a token
    (anyone who can reach the port would read every session) and for a port outside 0-65535.
    """
    host = settings.dashboard_host if host is None else host
    port = settings.dashboard_port if port is None else port
    if port not in PORTS:
        raise DashboardConfigError(f"port {port} is not a TCP port: use 1-65535, or 0 for any")
    if not is_loopback(host) and settings.dashboard_token is None:
        raise DashboardConfigError(
            f"binding the dashboard to {host} exposes it beyond this machine: "
            "set SESSIONS_DASHBOARD_TOKEN first"
        )
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, server_header=False, proxy_headers=False, log_level="info"
    )
    token = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    redact = RedactToken(token)
    access_log = logging.getLogger("uvicorn.access")
    access_log.addFilter(redact)
    try:
        uvicorn.Server(config).run()
    finally:
        access_log.removeFilter(redact)
        app.state.store.dispose()
