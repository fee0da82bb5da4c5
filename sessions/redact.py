"""Credentials out of whatever is shown: URLs, and settings or options that hold them.

:func:`mask_url` is the one function every log line, error message, CLI output and dashboard
page passes a database or broker URL through; :func:`mask_value` applies the same rules to
one named setting or option (nested mappings and lists included), and :func:`mask_target`
to a request line of the dashboard's access log. Both use only the
standard library, so importing them (and :mod:`sessions.settings`) loads no SQLAlchemy.

What is masked, generously, in every form SQLAlchemy, kombu, redis-py and libpq accept:

* the password of the userinfo, ``scheme://user:PASSWORD@host``. The libraries disagree on
  where an unencoded ``@`` ends it: SQLAlchemy at the first ``@`` after the ``:`` (a password
  may then hold ``/``, ``?`` and ``#``), urllib (kombu, redis-py) at the last ``@`` before the
  first ``/``. Neither is what was meant by ``u:hun@ter2@db``, so a password runs to the
  last ``@`` of the URL (no host holds one): that shows as ``u:***@db``. A userinfo without
  a ``:`` is a user name and stays, unless it decodes to one with a ``:`` (``u%3Apw@``),
  which is masked whole;
* the value of every parameter whose name, percent- and ``+``-decoded until it no longer
  changes, mentions a password, token, secret, key, credential, signature, cookie or auth
  (:data:`SECRET_NAME`): ``?password=``, ``?%70assword=``, ``?sslpassword=``, ``?api_key=``,
  ``?sentinel_password=``, case-insensitive. Parameters are split at ``&``, ``;`` and
  whitespace (so a libpq ``key=value`` string is covered too), and everything after the
  ``?`` counts as the query, ``#`` included;
* a parameter value that is itself a URL is masked by these rules, and one that is a URL
  only once decoded is masked whole;
* each URL of a ``;``-separated list (kombu's failover and Redis Sentinel lists).

Masking errs towards hiding: where a string can be read two ways, the larger part goes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_plus

#: What a secret is shown as.
MASK = "***"
#: A parameter, setting or option name that holds a secret (searched, case-insensitive, in
#: the decoded name): ``password``, ``passwd``, ``pwd``, ``sslpassword``, ``token``,
#: ``api_key``, ``ssl_keyfile``, ``aws_secret_access_key``, ``authorization``, ...
SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|key|auth|cred|signature|cookie|^pw$|^psw$", re.IGNORECASE
)

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
#: Where one URL of a ``;``-separated list ends and the next begins.
_LIST_SEPARATOR = re.compile(rf";(?=\s*{_SCHEME})")
#: SQLAlchemy's reading of the userinfo (its ``make_url`` pattern): a user name without
#: ``:`` or ``/``, then a password of anything but ``@``.
_SQLALCHEMY_USERINFO = re.compile(r"[^:/]*(?::[^@]*)?@")
#: Where the host (and port) of a URL ends for urllib.
_HOST_END = re.compile(r"[/?#]")
#: Separators of parameters; the groups keep them in the output.
_PARAMETER_SEPARATOR = re.compile(r"([&;\s]+)")
#: Rounds of percent-decoding a name gets before it is matched (``%2570`` is ``%70`` is ``p``).
_DECODE_ROUNDS = 5
#: A parameter value that is a URL is masked as one, to this depth of nesting.
_NESTED_DEPTH = 3


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``, safe for logs and error messages.

    ``url`` may be anything a user set (a malformed URL, a list, a libpq string): this never
    raises, and what it cannot read as a URL is still cleared of ``name=secret`` parameters.
    """
    return _mask_url(url, _NESTED_DEPTH)


def mask_target(target: str, secrets: Iterable[str] = ()) -> str:
    """An HTTP request target (``/path?query``) as an access log may show it.

    Parameters under a secret name have their value masked, the name decoded first
    (``?%74oken=`` is ``?token=``); a path, parameter name or value that holds one of
    ``secrets`` (the dashboard's token) once decoded is masked whole, however it was encoded.
    """
    known = [secret for secret in secrets if secret]
    path, question, query = target.partition("?")
    path = MASK if _holds(path, known) else path
    return path + question + _mask_parameters(query, _NESTED_DEPTH, known) if question else path


def mask_value(name: str, value: Any) -> Any:
    """``value`` of the setting or option ``name`` as it may be shown.

    A string under a secret name (:data:`SECRET_NAME`) is ``***``, any other string is
    :func:`mask_url`'d; mappings and lists are masked item by item (a mapping's keys name
    their values), so ``broker_transport_options={"sentinel_kwargs": {"password": ...}}``
    shows ``***``. Other values (numbers, paths, ``SecretStr``) are returned as they are.
    """
    if isinstance(value, Mapping):
        return {key: mask_value(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_value(name, item) for item in value)
    if isinstance(value, str | bytes):
        if value and SECRET_NAME.search(decode(name)):
            return MASK
        if isinstance(value, str):
            return mask_url(value)
    return value


def decode(text: str) -> str:
    """``text`` percent- and ``+``-decoded until it no longer changes (at most 5 rounds)."""
    return _decodings(text)[-1]


def _decodings(text: str) -> list[str]:
    """``text`` and each round of its decoding, up to :func:`decode`'s result."""
    rounds = [text]
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote_plus(rounds[-1])
        if decoded == rounds[-1]:
            break
        rounds.append(decoded)
    return rounds


def _mask_url(url: str, depth: int) -> str:
    parts = _LIST_SEPARATOR.split(url)
    if len(parts) > 1:
        return ";".join(_mask_url(part, depth) for part in parts)
    scheme = re.match(rf"\s*{_SCHEME}", url)
    if scheme is None:
        return _mask_parameters(url, depth)
    head, rest = url[: scheme.end()], url[scheme.end() :]
    end = _userinfo_end(rest)
    if end < 0:
        return head + _mask_tail(rest, depth)
    return f"{head}{_mask_userinfo(rest[:end])}@{_mask_tail(rest[end + 1 :], depth)}"


def _userinfo_end(rest: str) -> int:
    """Index in ``rest`` (the URL after ``scheme://``) of the ``@`` ending the userinfo, or -1."""
    sqlalchemy = _SQLALCHEMY_USERINFO.match(rest)
    host_end = _HOST_END.search(rest)
    urllib = rest.rfind("@", 0, host_end.start() if host_end else len(rest))
    end = max(sqlalchemy.end() - 1 if sqlalchemy else -1, urllib)
    if end >= 0 and ":" in decode(rest[:end]):
        # A password: it may hold '@', '/', '?' unencoded, so it runs to the last '@'.
        end = rest.rfind("@")
    return end


def _mask_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}"
    return MASK if ":" in decode(userinfo) else userinfo


def _mask_tail(tail: str, depth: int) -> str:
    """Host, path and query of a URL: only the query's parameters can hold secrets."""
    path, question, query = tail.partition("?")
    return path + question + _mask_parameters(query, depth) if question else tail


def _mask_parameters(text: str, depth: int, secrets: list[str] | None = None) -> str:
    pieces = _PARAMETER_SEPARATOR.split(text)
    for index in range(0, len(pieces), 2):  # odd indexes are the separators
        name, equals, value = pieces[index].partition("=")
        if secrets and _holds(name, secrets):
            name = MASK
        if equals and value:
            value = MASK if secrets and _holds(value, secrets) else value
            value = _mask_parameter(name, value, depth)
        pieces[index] = name + equals + value
    return "".join(pieces)


def _mask_parameter(name: str, value: str, depth: int) -> str:
    if SECRET_NAME.search(decode(name)):
        return MASK
    if "://" in value:
        return _mask_url(value, depth - 1) if depth > 0 else MASK
    return MASK if "://" in decode(value) else value


def _holds(text: str, secrets: list[str]) -> bool:
    """Whether ``text``, as it is or at any round of its decoding, contains one of ``secrets``."""
    return any(secret in form for form in _decodings(text) for secret in secrets)
