"""The dashboard's signed cookie, its redirect target, its access-log filter and its ports."""

from __future__ import annotations

import hashlib
import hmac
import logging
from urllib.parse import quote

import pytest

from sessions.dashboard.security import (
    CLOCK_SKEW,
    COOKIE_MAX_AGE,
    cookie_is_valid,
    cookie_value,
    local_target,
)
from sessions.dashboard.server import DashboardConfigError, RedactToken, serve
from sessions.redact import decode
from sessions.settings import Settings

TOKEN = "s3cret-token-for-tests-only"
NOW = 1_700_000_000


# -- the cookie --------------------------------------------------------------------------------


def test_a_cookie_holds_its_issue_time_and_not_the_token() -> None:
    value = cookie_value(TOKEN, NOW)
    issued, signature = value.split(".")
    assert issued == str(NOW) and len(signature) == 64
    assert TOKEN not in value
    assert cookie_value(TOKEN, NOW) == value  # deterministic: any dashboard process checks it


@pytest.mark.parametrize(
    ("age", "valid"),
    [
        (0, True),
        (COOKIE_MAX_AGE - 1, True),
        (COOKIE_MAX_AGE, False),  # the browser's Max-Age, enforced by the server
        (30 * 24 * 3600, False),
        (-CLOCK_SKEW, True),
        (-CLOCK_SKEW - 1, False),  # issued "in the future": not by this server
    ],
)
def test_a_cookie_is_valid_for_its_max_age_only(age: int, valid: bool) -> None:
    assert cookie_is_valid(cookie_value(TOKEN, NOW - age), TOKEN, NOW) is valid


def test_a_cookie_for_another_token_or_altered_is_refused() -> None:
    value = cookie_value(TOKEN, NOW)
    assert not cookie_is_valid(value, "another-token-of-enough-length", NOW)
    issued, signature = value.split(".")
    assert not cookie_is_valid(f"{NOW + 3600}.{signature}", TOKEN, NOW + 3600)  # time moved on
    assert not cookie_is_valid(f"{issued}.{signature[:-1]}0", TOKEN, NOW)


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "x",
        f"{NOW}",
        f"{NOW}.",
        f"+{NOW}.{'0' * 64}",
        f"{NOW}.{'0' * 64}",
        f"{'9' * 40}.{'0' * 64}",
        "\u0661" * 10 + "." + "0" * 64,  # digits int() reads, not ASCII ones
        # what the cookie was before: HMAC(token, constant), valid forever
        hmac.new(TOKEN.encode(), b"sessions-dashboard-cookie", hashlib.sha256).hexdigest(),
    ],
)
def test_malformed_and_old_cookies_are_refused(value: str) -> None:
    assert not cookie_is_valid(value, TOKEN, NOW)


# -- the redirect after a login ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/", "/"),
        ("/sessions", "/sessions"),
        ("//evil.example/", "/evil.example/"),  # the issue's probe: Location //evil.example/
        ("///evil.example", "/evil.example"),  # /%2F%2Fevil.example, decoded
        ("/\\evil.example", "/%5Cevil.example"),  # browsers read \ as /
        ("/\\/evil.example", "/%5C/evil.example"),
        ("/\t/evil.example", "/%09/evil.example"),  # browsers drop tabs and newlines
        ("/\r\n/evil.example", "/%0D%0A/evil.example"),
        ("/ /evil.example", "/%20/evil.example"),
        ("/\x00evil", "/%00evil"),
        ("https://evil.example/", "/https%3A//evil.example/"),
        ("evil.example", "/evil.example"),
        ("/%2F%2Fevil", "/%252F%252Fevil"),  # a literal % stays one
        ("/é", "/%C3%A9"),
    ],
)
def test_the_redirect_target_is_a_path_of_this_server(path: str, target: str) -> None:
    assert local_target(path) == target
    assert local_target(path, "status=active") == f"{target}?status=active"


@pytest.mark.parametrize("path", ["//a", "/\\a", "\\\\a", "/\t/a", "https:a", "//" * 50 + "a"])
def test_no_redirect_target_names_another_host(path: str) -> None:
    target = local_target(path)
    assert target.startswith("/") and target[1:2] not in ("/", "\\")
    assert all(c.isprintable() and not c.isspace() and c != "\\" for c in target)


# -- the access log ----------------------------------------------------------------------------


def _access_line(target: str) -> str:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", target, "1.1", 303),
        None,
    )
    assert RedactToken(TOKEN).filter(record)
    return record.getMessage()


@pytest.mark.parametrize(
    "target",
    [
        f"/?token={TOKEN}",
        f"/?%74oken={TOKEN}",  # the issue's probe: it authenticates, and was logged in clear
        f"/?%74%6F%6B%65%6E={TOKEN}",
        f"/?token={quote(TOKEN).replace('s', '%73')}",
        f"/?status=active&token={''.join(f'%{ord(c):02x}' for c in TOKEN)}",
        f"/?user={TOKEN}",
        f"/{TOKEN}",
    ],
)
def test_the_access_log_never_holds_the_token_in_any_encoding(target: str) -> None:
    line = _access_line(target)
    assert TOKEN not in line and TOKEN not in decode(line)
    assert line.startswith('127.0.0.1:5000 - "GET ') and line.endswith(' HTTP/1.1" 303')


# -- ports -------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_serve_refuses_a_port_that_is_no_tcp_port(port: int) -> None:
    with pytest.raises(DashboardConfigError, match=f"port {port} is not a TCP port"):
        serve(Settings(), port=port)
