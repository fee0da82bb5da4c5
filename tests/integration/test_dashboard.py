"""The dashboard over HTTP (Starlette's TestClient), on SQLite and PostgreSQL.

What it must guarantee beyond showing the numbers (the browser test reads those): bad
query parameters are a 400 naming the parameter and the rule, a configured token is
required, only GET and HEAD exist, and its database connections cannot write.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from html import unescape
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from httpx2 import Response
from sqlalchemy import event, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient

from sessions.dashboard.app import create_app
from sessions.dashboard.reads import (
    by_status,
    health_counts,
    health_level,
    open_read_only_store,
)
from sessions.dashboard.security import COOKIE, COOKIE_MAX_AGE, cookie_value
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import ledger_table, sessions_table
from tests.integration.support import batch, create, end, record

TOKEN = "s3cret-token-for-tests-only"
LOCAL = "http://127.0.0.1"
#: What a write through the dashboard's engine raises (SQLite: "attempt to write a readonly
#: database"; PostgreSQL: "cannot execute UPDATE in a read-only transaction").
READ_ONLY = pytest.raises(DBAPIError, match=r"(?i)read-?only")


def _message(response: object) -> str:
    """The error text an error page shows."""
    body = getattr(response, "text", "")
    found = re.search(r'data-testid="error-message">(.*?)</p>', body, re.S)
    assert found, body[:500]
    return unescape(found.group(1))


def _testid(body: str, testid: str) -> str:
    found = re.search(rf'data-testid="{testid}"[^>]*>(.*?)<', body, re.S)
    assert found, f"no {testid} in the page"
    return unescape(found.group(1)).strip()


@pytest.fixture
def seeded(store: SessionStore) -> SessionStore:
    """Five sessions of two users: one failing, one warned, one healthy, two ended."""
    store.apply(
        batch(
            create("healthy", 0, user_id="ann", metadata={"note": "<script>x</script>"}),
            *(record("healthy", 1, cost=0.25) for _ in range(4)),
            *(record("warned", 1, user_id="ann", error=n < 2) for n in range(5)),
            *(record("failing", 1, user_id="bob", error=n < 3) for n in range(4)),
            record("done", 1, user_id="bob", input_tokens=7, output_tokens=3, cost=1.5),
            record("gone", 1, user_id="bob", error=True),
        )
    )
    store.apply(batch(end("done", 2), end("gone", 2, "failed")))
    return store


@pytest.fixture
def client(seeded: SessionStore, database_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url)
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL) as client:
        yield client
    app.state.store.dispose()


@pytest.fixture
def token_client(seeded: SessionStore, database_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url, dashboard_token=TOKEN)
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL, follow_redirects=False) as client:
        yield client
    app.state.store.dispose()


# -- what the pages show -------------------------------------------------------------------


def test_overview_shows_the_stores_numbers(client: TestClient, seeded: SessionStore) -> None:
    page = client.get("/")
    assert page.status_code == 200
    rows = dict(
        re.findall(r'data-testid="status-row" data-status="(\w+)"(.*?)</tr>', page.text, re.S)
    )
    for status in ("active", "completed", "failed", "expired", "all"):
        expected = seeded.aggregate(status=None if status == "all" else status)
        assert _testid(rows[status], "sessions") == f"{expected.sessions:,}"
        assert _testid(rows[status], "requests") == f"{expected.request_count:,}"
        assert _testid(rows[status], "errors") == f"{expected.error_count:,}"
    assert _testid(page.text, "active-sessions") == str(seeded.count_active())
    health = health_counts(seeded)
    assert (health.warn, health.fail) == (1, 1)
    assert _testid(page.text, "health-warn") == "1"
    assert _testid(page.text, "health-fail") == "1"
    listed = re.findall(r'data-testid="unhealthy-row" data-session="([^"]+)"', page.text)
    assert listed == [r.session_id for r in seeded.unhealthy()] == ["failing", "warned"]


def test_sessions_by_status_are_the_stores_aggregates(seeded: SessionStore) -> None:
    """The grouped read gives what ``aggregate(status=...)`` gives, percentiles included."""
    reader = open_read_only_store(Settings(database_url=seeded.url))
    breakdown = by_status(reader)
    reader.dispose()
    for status, aggregate in breakdown.by_status.items():
        assert aggregate == seeded.aggregate(status=status), status
    assert breakdown.by_status["expired"].sessions == 0
    total = seeded.aggregate()
    assert breakdown.total.model_dump(exclude={"cost"}) == total.model_dump(exclude={"cost"})
    assert breakdown.total.cost == pytest.approx(total.cost)  # summed in another order


def test_health_reads_take_the_partial_index_without_statistics(seeded: SessionStore) -> None:
    """``unhealthy`` and the health counts read the active sessions' error-rate bounds
    through ``ix_sessions_active_error_rate_bound``. SQLite never gets statistics from the
    store, and without them it read every active session through ``(status,
    last_activity_minute)`` instead (on 100,000 sessions 183 ms instead of 24 for
    ``unhealthy``); PostgreSQL gets the same SQL it always did."""
    statements: list[tuple[str, object]] = []

    def capture(_conn: object, _cursor: object, statement: str, parameters: object, *_: object):
        if "error_rate_bound >" in statement:
            statements.append((statement, parameters))

    event.listen(seeded.engine, "before_cursor_execute", capture)
    try:
        seeded.unhealthy()
        health_counts(seeded)
    finally:
        event.remove(seeded.engine, "before_cursor_execute", capture)
    reads = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 2, statements
    if seeded.engine.dialect.name != "sqlite":
        assert not any("likely" in statement for statement, _ in statements)
        return
    with seeded.engine.connect() as connection:
        stats = connection.exec_driver_sql(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_stat1'"
        ).scalar()
        assert stats == 0, "the premise: no statistics"
        cursor = connection.connection.cursor()
        for statement, parameters in reads:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " / ".join(row[3] for row in cursor.fetchall())
            assert "ix_sessions_active_error_rate_bound" in plan, (statement, plan)


def test_health_level_is_the_sweeps_rule(seeded: SessionStore) -> None:
    levels = {r.session_id: health_level(r, seeded.settings) for r in seeded.iter_sessions()}
    assert levels == {
        "healthy": None,
        "warned": "warn",
        "failing": "fail",
        "done": None,  # ended sessions are not judged
        "gone": None,
    }


def test_session_detail_shows_every_counter_and_escapes_metadata(
    client: TestClient, seeded: SessionStore
) -> None:
    page = client.get("/session", params={"id": "healthy"})
    assert page.status_code == 200
    stored = seeded.get("healthy")
    assert stored is not None
    assert _testid(page.text, "session-id") == "healthy"
    assert _testid(page.text, "requests") == str(stored.request_count)
    assert _testid(page.text, "cost") == f"{stored.cost:,.4f}"
    assert "<script>x</script>" not in page.text
    assert "&lt;script&gt;x&lt;/script&gt;" in page.text


def test_session_ids_with_slashes_and_percent_signs_round_trip(
    client: TestClient, seeded: SessionStore
) -> None:
    seeded.apply(batch(record("tenant/a%2Fb?x", 1, user_id="ann")))
    listing = client.get("/sessions", params={"user": "ann"})
    link = re.search(r'href="(/session\?id=tenant[^"]+)"', listing.text)
    assert link is not None
    page = client.get(unescape(link.group(1)))
    assert page.status_code == 200
    assert _testid(page.text, "session-id") == "tenant/a%2Fb?x"


def test_session_list_pages_by_keyset(client: TestClient, seeded: SessionStore) -> None:
    first = client.get("/sessions", params={"limit": 2})
    ids = re.findall(r'data-testid="session-row" data-session="([^"]+)"', first.text)
    assert ids == [r.session_id for r in seeded.list_sessions(limit=2)]
    following = re.search(r'data-testid="next-page" href="([^"]+)"', first.text)
    assert following is not None
    second = client.get(unescape(following.group(1)))
    ids = re.findall(r'data-testid="session-row" data-session="([^"]+)"', second.text)
    assert ids == [r.session_id for r in seeded.list_sessions(limit=2, after="failing")]


def test_a_users_list_shows_the_users_totals(client: TestClient, seeded: SessionStore) -> None:
    page = client.get("/sessions", params={"user": "bob", "status": ""})
    assert page.status_code == 200
    expected = seeded.aggregate(user_id="bob")
    assert _testid(page.text, "user-requests") == str(expected.request_count)
    assert _testid(page.text, "user-cost") == f"{expected.cost:,.4f}"


def test_unknown_session_is_404(client: TestClient) -> None:
    response = client.get("/session", params={"id": "nobody"})
    assert response.status_code == 404
    assert _message(response) == "no session 'nobody'"


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/", {"top": "0"}, "query parameter 'top': input should be greater than or equal to 1"),
        ("/", {"top": "many"}, "query parameter 'top': input should be a valid integer"),
        ("/", {"minutes": "100000"}, "query parameter 'minutes': input should be less than"),
        ("/", {"by": "latency"}, "query parameter 'by': input should be 'requests', 'errors'"),
        ("/", {"limt": "5"}, "query parameter 'limt': unknown parameter"),
        ("/", [("top", "1"), ("top", "2")], "query parameter 'top': given more than once"),
        ("/sessions", {"status": "paused"}, "query parameter 'status': input should be 'active'"),
        ("/sessions", {"limit": "501"}, "query parameter 'limit': input should be less than"),
        (
            "/sessions",
            {"user": "two words"},
            "query parameter 'user': must be 1 to 255 printable ASCII characters without spaces",
        ),
        ("/sessions", {"after": "x" * 256}, "query parameter 'after': must be 1 to 255"),
        ("/session", {"id": "healthy", "full": "1"}, "query parameter 'full': unknown parameter"),
        ("/session", {"id": "x" * 256}, "query parameter 'id': must be 1 to 255"),
        ("/session", {}, "query parameter 'id': required"),
        # the issue's probes: an empty name is named, and int() is not the rule for numbers
        ("/", [("", "1")], "query parameter '' (no name): unknown parameter"),
        ("/", {"top": "1_0"}, "query parameter 'top': input should be a valid integer in the"),
        ("/", {"minutes": " 60"}, "query parameter 'minutes': input should be a valid integer"),
        ("/sessions", {"limit": "+5"}, "query parameter 'limit': input should be a valid integer"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter_and_rule(
    client: TestClient, path: str, params: object, message: str
) -> None:
    response = client.get(path, params=params)  # type: ignore[arg-type]
    assert response.status_code == 400
    assert _message(response).startswith(message)


def test_every_broken_parameter_is_named_at_once(client: TestClient) -> None:
    response = client.get("/", params={"top": "0", "minutes": "1"})
    assert response.status_code == 400
    assert "'top'" in _message(response) and "'minutes'" in _message(response)


# -- nothing writes -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/", "/sessions", "/session?id=healthy"])
def test_only_get_and_head_exist(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


def test_head_answers_without_a_body(client: TestClient) -> None:
    response = client.head("/")
    assert response.status_code == 200
    assert response.content == b""


def test_the_dashboards_engine_refuses_writes(seeded: SessionStore, database_url: str) -> None:
    before = seeded.get("healthy")
    reader = open_read_only_store(Settings(database_url=database_url))
    try:
        with READ_ONLY, reader.engine.begin() as connection:
            connection.execute(update(sessions_table).values(request_count=0))
        with READ_ONLY:
            reader.apply(batch(record("healthy", 3)))
        with READ_ONLY, reader.engine.connect() as connection:
            connection.execute(text("DELETE FROM sessions"))
            connection.commit()
        assert reader.get("healthy") == before == seeded.get("healthy")
        with reader.engine.connect() as connection:
            assert connection.execute(select(ledger_table.c.batch_id)).all() != []
    finally:
        reader.dispose()


def test_the_dashboard_reads_sqlite_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    """A reader must not take the write lock: it would stall workers, and wait for them."""
    url = f"sqlite:///{tmp_path}/locked.db"
    writer = SessionStore(url, settings=Settings())
    writer.upgrade()
    writer.apply(batch(record("s", 1)))
    reader = open_read_only_store(Settings(database_url=url))
    holding, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        with writer.engine.begin() as connection:  # BEGIN IMMEDIATE
            connection.execute(
                insert(ledger_table).values(batch_id=uuid.uuid4(), applied_at=datetime.now(UTC))
            )
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold_the_write_lock)
    thread.start()
    try:
        assert holding.wait(30)
        # With BEGIN IMMEDIATE this would wait out the busy timeout and fail "locked".
        assert reader.count_active() == 1
        assert reader.get("s") is not None
    finally:
        release.set()
        thread.join(30)
        reader.dispose()
        writer.dispose()


# -- the token -----------------------------------------------------------------------------


def test_without_the_token_every_page_is_401(token_client: TestClient) -> None:
    for path in ("/", "/sessions", "/session?id=healthy", "/session?id=nobody", "/nowhere"):
        response = token_client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "healthy" not in response.text
    assert token_client.post("/").status_code == 401  # not even the routes are revealed


@pytest.mark.parametrize(
    "authorization", ["Bearer wrong-token-of-enough-length", "Basic " + TOKEN, TOKEN, "Bearer"]
)
def test_a_wrong_token_is_401(token_client: TestClient, authorization: str) -> None:
    assert token_client.get("/", headers={"Authorization": authorization}).status_code == 401


def test_the_bearer_header_opens_every_page(token_client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert token_client.get("/", headers=headers).status_code == 200
    assert token_client.get("/session?id=healthy", headers=headers).status_code == 200
    assert token_client.get("/", headers={"Authorization": f"bearer  {TOKEN}"}).status_code == 200


def test_the_token_in_the_address_sets_a_cookie_and_leaves_the_address(
    token_client: TestClient,
) -> None:
    response = token_client.get("/sessions", params={"token": TOKEN, "status": "active"})
    assert response.status_code == 303
    assert response.headers["location"] == "/sessions?status=active"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert TOKEN not in cookie
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    following = token_client.get(response.headers["location"])
    assert following.status_code == 200
    assert "warned" in following.text


def test_a_wrong_token_in_the_address_sets_no_cookie(token_client: TestClient) -> None:
    response = token_client.get("/", params={"token": "wrong"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    token_client.cookies.set(COOKIE, TOKEN)  # the token itself is not the cookie
    assert token_client.get("/").status_code == 401


def test_the_token_in_any_encoding_is_a_login_that_leaves_the_address(
    token_client: TestClient,
) -> None:
    """``?%74oken=`` is ``?token=`` to Starlette: it logs in, and is taken out of the address."""
    response = token_client.get(f"/sessions?status=active&%74oken={TOKEN}")
    assert response.status_code == 303
    assert response.headers["location"] == "/sessions?status=active"
    assert token_client.get(response.headers["location"]).status_code == 200


def test_the_token_in_the_address_is_taken_out_even_when_already_logged_in(
    token_client: TestClient,
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = token_client.get("/", params={"token": TOKEN, "top": "5"}, headers=headers)
    assert response.status_code == 303 and response.headers["location"] == "/?top=5"
    # A wrong or repeated one is refused, whatever else the request presents.
    assert token_client.get("/", params={"token": "wrong"}, headers=headers).status_code == 401
    repeated = token_client.get("/", params=[("token", TOKEN), ("token", TOKEN)])
    assert repeated.status_code == 401 and "set-cookie" not in repeated.headers


def _login_cookie(client: TestClient) -> str:
    response = client.get("/", params={"token": TOKEN})
    assert response.status_code == 303
    client.cookies.clear()
    return response.cookies[COOKIE]


def _with_cookie(client: TestClient, value: str) -> Response:
    client.cookies.clear()
    client.cookies.set(COOKIE, value)
    try:
        return client.get("/")
    finally:
        client.cookies.clear()


def test_the_cookie_is_signed_with_its_issue_time_and_expires_on_the_server(
    token_client: TestClient,
) -> None:
    before = int(time.time())
    value = _login_cookie(token_client)
    issued = int(value.split(".")[0])
    assert before <= issued <= time.time() and TOKEN not in value
    assert _with_cookie(token_client, value).status_code == 200
    # The same cookie, as the server would have issued it 12 hours ago: refused now, although
    # a browser (or an attacker) that kept it would still send it.
    old = cookie_value(TOKEN, issued - COOKIE_MAX_AGE)
    assert _with_cookie(token_client, old).status_code == 401
    almost = cookie_value(TOKEN, issued - COOKIE_MAX_AGE + 120)
    assert _with_cookie(token_client, almost).status_code == 200


def test_cookies_of_the_old_kind_or_of_another_token_are_refused(token_client: TestClient) -> None:
    forever = hmac.new(TOKEN.encode(), b"sessions-dashboard-cookie", hashlib.sha256).hexdigest()
    other = cookie_value("another-token-of-enough-length", int(time.time()))
    for value in (forever, other, TOKEN, ""):
        assert _with_cookie(token_client, value).status_code == 401, value


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("//evil.example/", "/evil.example/"),  # the issue's probe: was //evil.example/
        ("///evil.example/", "/evil.example/"),
        ("/%2F%2Fevil.example/", "/evil.example/"),
        ("/%2F/evil.example/", "/evil.example/"),
        ("/\\evil.example/", "/%5Cevil.example/"),  # browsers read a backslash as /
        ("/%5C%5Cevil.example/", "/%5C%5Cevil.example/"),
        ("/%5C/evil.example/", "/%5C/evil.example/"),
        ("/%09/evil.example/", "/%09/evil.example/"),
        ("/%0D%0A/evil.example/", "/%0D%0A/evil.example/"),
        ("/https://evil.example/", "/https%3A//evil.example/"),
        ("/sessions", "/sessions"),
    ],
)
def test_the_login_redirects_only_to_a_path_of_this_server(
    token_client: TestClient, path: str, location: str
) -> None:
    response = token_client.get(f"{LOCAL}{path}?token={TOKEN}")
    assert response.status_code == 303
    assert response.headers["location"] == location
    assert urlsplit(response.headers["location"]).netloc == ""


# -- what the browser may do ------------------------------------------------------------------


def test_pages_allow_no_script_and_no_framing(client: TestClient) -> None:
    response = client.get("/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert "frame-ancestors 'none'" in policy
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None and f'<style nonce="{nonce.group(1)}">' in response.text
    assert response.headers["cache-control"] == "no-store"
    assert "<script" not in response.text


def test_without_a_token_only_local_host_names_are_served(client: TestClient) -> None:
    """Otherwise a web page could read the dashboard by DNS rebinding."""
    assert client.get("/", headers={"Host": "localhost:8750"}).status_code == 200
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 400


def test_the_header_shows_the_database_url_without_its_credentials(
    seeded: SessionStore, postgres_url: str
) -> None:
    """The issue's probe: ``?password=`` was shown in clear in every page's header."""
    url = f"{postgres_url}?password=hunter2&application_name=dashboard"
    app = create_app(Settings(database_url=url))
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get("/")
    app.state.store.dispose()
    assert response.status_code == 200
    assert "password=***&amp;application_name=dashboard" in response.text
    assert "hunter2" not in response.text


def test_a_database_without_the_schema_is_a_503_that_says_so(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}"))
    with TestClient(app, base_url=LOCAL) as client:
        response = client.get("/")
    app.state.store.dispose()
    assert response.status_code == 503
    assert _message(response).endswith("empty.db has no schema yet.")
