"""Masking credentials (sessions/redact.py) in every form SQLAlchemy, kombu and redis-py read.

Each fixed case is a probe of issue 12 item 6 or a form the libraries document; the
properties generate passwords of every character that ends a URL part, raw and encoded, and
read the masked URL back with the libraries' own parsers (SQLAlchemy's ``make_url``, kombu's
``url_to_parts``): the same user, host and database, and ``***`` for the password.
"""

from __future__ import annotations

import ast
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.url import url_to_parts
from sqlalchemy.engine import make_url

from sessions import redact, settings
from sessions.redact import MASK, mask_target, mask_url, mask_value

SECRET = "hunter2"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # the probes
        (
            "postgresql+psycopg://u@h/db?password=hunter2",
            "postgresql+psycopg://u@h/db?password=***",
        ),
        ("postgresql://u:hun@ter2@127.0.0.1/db", "postgresql://u:***@127.0.0.1/db"),
        # userinfo passwords, raw and percent-encoded, with the characters that end parts
        ("postgresql+psycopg://u:hunter2@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
        ("postgresql://u:hun%40ter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hun/ter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hun?ter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hun#ter2@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u:h@u/n?t@er2@h/db?sslmode=require",
            "postgresql://u:***@h/db?sslmode=require",
        ),
        ("postgresql://u:hun:ter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u%3Ahunter2@h/db", "postgresql://***@h/db"),
        (
            "mysql+pymysql://root:hunter2@127.0.0.1:3306/db",
            "mysql+pymysql://root:***@127.0.0.1:3306/db",
        ),
        # Redis: password only, TLS, a user (Redis 6 ACL), a socket, Sentinel lists
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "rediss://:hunter2@h:6380/0?ssl_cert_reqs=required",
            "rediss://:***@h:6380/0?ssl_cert_reqs=required",
        ),
        ("redis://default:hunter2@h/0", "redis://default:***@h/0"),
        (
            "redis+socket:///tmp/redis.sock?password=hunter2",
            "redis+socket:///tmp/redis.sock?password=***",
        ),
        (
            "unix:///tmp/redis.sock?db=0&password=hunter2",
            "unix:///tmp/redis.sock?db=0&password=***",
        ),
        (
            "sentinel://:hunter2@h1:26379;sentinel://:hunter3@h2:26379",
            "sentinel://:***@h1:26379;sentinel://:***@h2:26379",
        ),
        (
            "sentinel://:hunter2@h1:26379; sentinel://h2:26379",
            "sentinel://:***@h1:26379; sentinel://h2:26379",
        ),
        # AMQP
        ("amqp://guest:hunter2@127.0.0.1:5672/vhost", "amqp://guest:***@127.0.0.1:5672/vhost"),
        ("amqps://guest:hunter2@h//?heartbeat=10", "amqps://guest:***@h//?heartbeat=10"),
        (
            "pyamqp://guest:hunter2@h1;pyamqp://guest:hunter2@h2",
            "pyamqp://guest:***@h1;pyamqp://guest:***@h2",
        ),
        # secret query parameters, any case, any encoding, any separator
        ("postgresql://h/db?sslpassword=hunter2", "postgresql://h/db?sslpassword=***"),
        ("postgresql://h/db?%70assword=hunter2", "postgresql://h/db?%70assword=***"),
        ("postgresql://h/db?%2570assword=hunter2", "postgresql://h/db?%2570assword=***"),
        ("postgresql://h/db?pass+word=hunter2", "postgresql://h/db?pass+word=***"),
        ("postgresql://h/db?PassWord=hunter2", "postgresql://h/db?PassWord=***"),
        ("mysql://h/db?passwd=hunter2&charset=utf8", "mysql://h/db?passwd=***&charset=utf8"),
        ("mssql://h/db?PWD=hunter2;Encrypt=yes", "mssql://h/db?PWD=***;Encrypt=yes"),
        (
            "sqs://h/?aws_secret_access_key=hunter2&region=eu",
            "sqs://h/?aws_secret_access_key=***&region=eu",
        ),
        (
            "x://h/?api_key=a&token=b&secret=c&auth=d",
            "x://h/?api_key=***&token=***&secret=***&auth=***",
        ),
        ("redis://h/0?sentinel_password=hunter2", "redis://h/0?sentinel_password=***"),
        ("postgresql://h/db?password=hun#ter2", "postgresql://h/db?password=***"),
        ("postgresql://h/db?password=", "postgresql://h/db?password="),
        # a parameter that is a URL is masked as one, or whole when it only decodes to one
        ("redis://h/0?fallback=redis://:hunter2@h2", "redis://h/0?fallback=redis://:***@h2"),
        ("redis://h/0?fallback=redis%3A%2F%2F%3Ahunter2%40h2", "redis://h/0?fallback=***"),
        # what holds no secret is left as it is
        ("sqlite:///sessions.db", "sqlite:///sessions.db"),
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
        ("sqlite://", "sqlite://"),
        ("filesystem://", "filesystem://"),
        ("postgresql://agent@h/db?sslmode=require", "postgresql://agent@h/db?sslmode=require"),
        ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db"),
        ("postgresql://u@h/db?application_name=a@b", "postgresql://u@h/db?application_name=a@b"),
        # not a URL at all: a libpq string is still cleared of its password
        ("host=h password=hunter2 dbname=d", "host=h password=*** dbname=d"),
        ("", ""),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_nothing_of_a_password_with_every_separator_shows() -> None:
    for password in ("a@b", "a@b@c", "a/b@c", "a?b@c", "a#b@c", "@", "a:b@c/d?e"):
        url = f"postgresql://u:{password}@db.example:5432/sessions"
        assert mask_url(url) == "postgresql://u:***@db.example:5432/sessions", password


# -- against the libraries' own parsers -----------------------------------------------------

#: Passwords of capital letters and the characters that end URL parts; everything else in
#: the generated URLs is lower case, so a capital in the masked text is a leak.
PASSWORDS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ@:/?#%&=;+", min_size=1, max_size=20)
LOWER = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
SCHEMES = st.sampled_from(["postgresql+psycopg", "mysql+pymysql", "redis", "rediss", "amqp"])


@given(scheme=SCHEMES, user=LOWER, password=PASSWORDS, host=LOWER, path=LOWER)
def test_no_character_of_a_raw_password_shows(
    scheme: str, user: str, password: str, host: str, path: str
) -> None:
    masked = mask_url(f"{scheme}://{user}:{password}@{host}:5432/{path}?sslmode=require")
    assert not any(c.isupper() for c in masked), masked


@given(scheme=SCHEMES, user=LOWER, password=PASSWORDS, host=LOWER, path=LOWER)
def test_an_encoded_password_is_masked_and_the_rest_is_kept(
    scheme: str, user: str, password: str, host: str, path: str
) -> None:
    url = f"{scheme}://{user}:{quote(password, safe='')}@{host}:5432/{path}"
    assert mask_url(url) == f"{scheme}://{user}:***@{host}:5432/{path}"
    # What the libraries read back from the masked URL: the same place, no password.
    parsed = make_url(mask_url(url))
    assert (parsed.username, parsed.password, parsed.host, parsed.database) == (
        user,
        MASK,
        host,
        path,
    )
    parts = url_to_parts(mask_url(url))
    assert (parts.hostname, parts.username, parts.password) == (host, user, MASK)


NAMES = st.sampled_from(
    ["password", "passwd", "pwd", "sslpassword", "token", "secret", "api_key", "key", "auth"]
)


@given(name=NAMES, data=st.data())
def test_a_secret_parameter_is_masked_in_any_case_and_encoding(
    name: str, data: st.DataObject
) -> None:
    spelt = "".join(
        data.draw(st.sampled_from([c, c.upper(), f"%{ord(c):02x}", f"%{ord(c):02X}"])) for c in name
    )
    value = data.draw(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ%+/:@", min_size=1))
    masked = mask_url(f"postgresql://h/db?sslmode=require&{spelt}={value}&connect_timeout=5")
    assert masked == f"postgresql://h/db?sslmode=require&{spelt}=***&connect_timeout=5"


@given(st.text())
def test_any_text_is_masked_without_an_exception(text: str) -> None:
    assert isinstance(mask_url(text), str)


# -- settings and options --------------------------------------------------------------------


def test_mask_value_masks_secrets_under_names_and_in_urls_at_any_depth() -> None:
    options = {
        "master_name": "mymaster",
        "sentinel_kwargs": {"password": SECRET, "socket_timeout": 1},
        "PASSWORD": SECRET,
        "ssl": {"ssl_keyfile": "/etc/key.pem", "ssl_ca_certs": "/etc/ca.pem"},
        "alternates": ["redis://:hunter2@h1", "redis://:hunter2@h2"],
        "api_token": b"hunter2",
        "visibility_timeout": 3600,
    }
    assert mask_value("broker_transport_options", options) == {
        "master_name": "mymaster",
        "sentinel_kwargs": {"password": MASK, "socket_timeout": 1},
        "PASSWORD": MASK,
        "ssl": {"ssl_keyfile": MASK, "ssl_ca_certs": "/etc/ca.pem"},
        "alternates": ["redis://:***@h1", "redis://:***@h2"],
        "api_token": MASK,
        "visibility_timeout": 3600,
    }
    assert mask_value("database_url", "postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"


# -- request targets of the dashboard's access log ----------------------------------------------

TOKEN = "s3cret-token-for-tests-only"


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ("/?token=" + TOKEN, "/?token=***"),
        ("/?%74oken=" + TOKEN, "/?%74oken=***"),
        ("/?%2574oken=" + TOKEN, "/?%2574oken=***"),
        ("/?TOKEN=" + TOKEN, "/?TOKEN=***"),
        (
            "/sessions?status=active&token=" + TOKEN + "&limit=5",
            "/sessions?status=active&token=***&limit=5",
        ),
        ("/?token=" + quote(TOKEN, safe="").replace("s", "%73"), "/?token=***"),
        # the token under another name, or as a name, or in the path, in any encoding
        ("/?user=" + TOKEN, "/?user=***"),
        ("/?user=" + "".join(f"%{ord(c):02X}" for c in TOKEN), "/?user=***"),
        ("/?" + TOKEN + "=1", "/?***=1"),
        ("/" + TOKEN, "***"),
        ("/sessions?status=active", "/sessions?status=active"),
        ("/", "/"),
    ],
)
def test_mask_target(target: str, shown: str) -> None:
    assert mask_target(target, [TOKEN]) == shown


def test_masking_needs_no_database_library() -> None:
    """The client imports settings (and so the masking): it must not pull in SQLAlchemy for it."""
    for module in (redact, settings):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {name for name in imported if name.split(".")[0] in ("sqlalchemy", "kombu")}
