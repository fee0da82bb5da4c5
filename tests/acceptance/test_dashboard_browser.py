"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright.

``sessions dashboard`` runs as an operator starts it (a subprocess, with a token in its
environment) over a store seeded through ``store.apply``. The test reads the numbers the
page shows and checks them against the store, clicks through to a session, and takes a
screenshot (from the SQLite run): into the test's folder, or, with
``SESSIONS_UPDATE_SCREENSHOT=1``, over ``docs/dashboard.png``, the one the README shows (so an
ordinary test run leaves the work tree as it was).

Playwright's own browser downloads are never used: ``executable_path`` points at the
``chromium`` found on ``PATH`` (Debian's package, which ``.ci/run`` installs when it is missing;
``make`` never does, it needs root). Without it the test is skipped, saying so, or fails when
``SESSIONS_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from sessions.events import Batch, CreateEvent, EndEvent, RecordEvent
from sessions.records import UserRanking
from sessions.store import SessionStore
from tests.support.services import missing_service
from tests.support.waiting import cpu_progress
from tests.support.workers_harness import free_port, service_environment, wait_until

pytestmark = pytest.mark.slow

#: The browser's command, looked for on ``PATH``.
CHROMIUM = "chromium"
#: Headless, and quiet: without the background-networking flags Chromium keeps trying to
#: reach Google's services, which this closed network answers with nothing.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-0123456789"
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Seconds the dashboard may go without using CPU before it answers (it is starting meanwhile).
START_DEADLINE = 60.0

USERS = ["acme-support", "billing-bot", "research-agent", "onboarding", "sales-assist", "ops"]


def seed(store: SessionStore, now: datetime) -> None:
    """About forty sessions of six users within the last hour, as agents would record them.

    Every event lies between 55 and 1 minutes ago, so the page's 60-minute window and the
    test's own reading of it hold the same events even when a minute turns in between.
    """
    rng = random.Random(2024)
    events: list[CreateEvent | RecordEvent | EndEvent] = []
    for n in range(40):
        user = USERS[min(int(len(USERS) * rng.random() ** 1.6), len(USERS) - 1)]
        session_id = f"{user}-{n:03d}"
        started = now - timedelta(minutes=rng.uniform(5, 55))
        span = (now - timedelta(minutes=1) - started) * rng.uniform(0.2, 1.0)
        error_rate = 0.7 if n % 13 == 5 else 0.4 if n % 11 == 3 else 0.03
        metadata = {"model": rng.choice(["small", "large"]), "region": rng.choice(["eu", "us"])}
        events.append(
            CreateEvent(session_id=session_id, user_id=user, at=started, metadata=metadata)
        )
        times = sorted(started + span * rng.random() for _ in range(rng.randint(3, 60)))
        for moment in times:
            tokens_in, tokens_out = rng.randint(100, 3000), rng.randint(50, 900)
            events.append(
                RecordEvent(
                    session_id=session_id,
                    at=moment,
                    processing_time=round(rng.lognormvariate(-1.2, 0.7), 4),
                    error=rng.random() < error_rate,
                    input_tokens=tokens_in,
                    output_tokens=tokens_out,
                    cost=round((tokens_in * 3 + tokens_out * 15) / 1_000_000, 6),
                )
            )
        fate, ended = n % 10, times[-1]
        if fate in (0, 1, 2, 3):
            events.append(EndEvent(session_id=session_id, at=ended, status="completed"))
        elif fate == 4:
            events.append(EndEvent(session_id=session_id, at=ended, status="expired"))
        elif fate == 5 and error_rate < 0.1:
            events.append(EndEvent(session_id=session_id, at=ended, status="failed"))
    events.sort(key=lambda event: event.at)  # as a fleet would send them
    for start in range(0, len(events), 500):
        assert store.apply(Batch(events=tuple(events[start : start + 500]))).rejected == 0


@pytest.fixture
def chromium() -> str:
    """The path of the ``chromium`` executable; skips (or fails in CI) without one."""
    found = shutil.which(CHROMIUM)
    if found is None:
        missing_service(
            f"no {CHROMIUM!r} on PATH, so the dashboard's browser test cannot run "
            "(install Debian's package: `apt-get install chromium`, as .ci/run does)"
        )
    return found


@pytest.fixture
def dashboard(store: SessionStore, database_url: str, tmp_path: Path) -> Iterator[str]:
    """``sessions dashboard`` on a free port over the seeded store; its base URL."""
    seed(store, datetime.now(UTC))
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "sessions.cli", "dashboard", "--port", str(port)],
        env=service_environment(SESSIONS_DATABASE_URL=database_url, SESSIONS_DASHBOARD_TOKEN=TOKEN),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"the dashboard exited: {(tmp_path / 'dashboard.log').read_text()}"
            )
        try:
            urllib.request.urlopen(base + "/", timeout=2)
        except urllib.error.HTTPError as refused:
            return refused.code == 401  # up, and asking for its token
        except OSError:
            return False  # not listening yet
        return False

    try:
        wait_until(
            answers, START_DEADLINE, "the dashboard to answer", progress=cpu_progress(process.pid)
        )
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    served = (tmp_path / "dashboard.log").read_text()
    assert "GET /?token=*** " in served, served  # the access log has the visit ...
    assert TOKEN not in served  # ... but not the credential


def _number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def _ms(text: str) -> float:
    """A time the page shows (``949 ms``, ``12.3 ms``) in seconds."""
    assert text.endswith(" ms"), text
    return _number(text) / 1000


def check_top_users(page: Page, store: SessionStore, by: UserRanking) -> None:
    """The top-users table lists ``store.top_users(by)``, in its order, with its numbers."""
    expected = store.top_users(by=by, limit=10)
    rows = page.locator('[data-testid="top-user-row"]')
    assert [rows.nth(i).get_attribute("data-user") for i in range(rows.count())] == [
        user.user_id for user in expected
    ]
    for i, user in enumerate(expected):
        row = rows.nth(i)
        assert _number(row.get_by_test_id("sessions").inner_text()) == user.sessions
        assert _number(row.get_by_test_id("requests").inner_text()) == user.request_count
        assert _number(row.get_by_test_id("errors").inner_text()) == user.error_count
        assert _number(row.get_by_test_id("cost").inner_text()) == pytest.approx(
            user.cost, abs=5e-5
        )
        assert user.processing_time_p95 is not None
        # Shown to the millisecond above 100 ms, to a tenth below.
        assert _ms(row.get_by_test_id("p95").inner_text()) == pytest.approx(
            user.processing_time_p95, abs=5e-4
        )


def test_the_page_shows_the_stores_numbers_in_chromium(
    chromium: str, dashboard: str, store: SessionStore, database_url: str, tmp_path: Path
) -> None:
    update_readme = os.environ.get("SESSIONS_UPDATE_SCREENSHOT", "") not in ("", "0")
    screenshot = README_SCREENSHOT if update_readme else tmp_path / "dashboard.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            # Without the token: 401 and not a number of the fleet.
            response = page.goto(dashboard + "/")
            assert response is not None and response.status == 401
            assert "needs its token" in page.get_by_test_id("error-message").inner_text()

            # The token once in the address: a cookie, and the address without it.
            response = page.goto(f"{dashboard}/?token={TOKEN}")
            assert response is not None and response.status == 200
            assert page.url == dashboard + "/"
            assert TOKEN not in page.content()

            # Sessions by status, and the total, as the store aggregates them.
            for status in ("active", "completed", "failed", "expired", "all"):
                row = page.locator(f'[data-testid="status-row"][data-status="{status}"]')
                expected = store.aggregate(status=None if status == "all" else status)
                assert _number(row.get_by_test_id("sessions").inner_text()) == expected.sessions
                assert _number(row.get_by_test_id("requests").inner_text()) == (
                    expected.request_count
                )
                assert _number(row.get_by_test_id("errors").inner_text()) == expected.error_count
                assert _number(row.get_by_test_id("cost").inner_text()) == pytest.approx(
                    expected.cost, abs=5e-5
                )
            assert _number(page.get_by_test_id("active-sessions").inner_text()) == (
                store.count_active()
            )

            # The chart's window: the events per minute the store counts.
            since = datetime.now(UTC) - timedelta(minutes=59)
            activity = store.activity(since)
            assert _number(page.get_by_test_id("events-window").inner_text()) == sum(
                minute.events for minute in activity
            )
            assert _number(page.get_by_test_id("active-peak").inner_text()) == max(
                minute.active_sessions for minute in activity
            )
            assert page.get_by_test_id("events-chart").locator("rect.bar").count() == sum(
                1 for minute in activity if minute.events
            )

            # Top users, by requests and then, after a click on its header, by p95.
            check_top_users(page, store, "requests")
            if database_url.startswith("sqlite"):
                page.screenshot(path=str(screenshot), full_page=True)
                assert screenshot.read_bytes().startswith(PNG_SIGNATURE)

            page.get_by_test_id("sort-p95").click()
            page.wait_for_url("**/?by=p95*")
            check_top_users(page, store, "p95")

            # Health: the sessions listed are the store's unhealthy ones, worst first.
            listed = page.locator('[data-testid="unhealthy-row"]')
            unhealthy = store.unhealthy()
            assert unhealthy, "the seed has unhealthy active sessions"
            assert [listed.nth(i).get_attribute("data-session") for i in range(listed.count())] == [
                r.session_id for r in unhealthy
            ][: listed.count()]

            # Click through to the worst session's detail page.
            worst = unhealthy[0]
            listed.first.get_by_test_id("session-link").click()
            page.wait_for_url(f"**/session?id={worst.session_id}")
            stored = store.get(worst.session_id)
            assert stored is not None
            assert page.get_by_test_id("session-id").inner_text() == stored.session_id
            assert _number(page.get_by_test_id("requests").inner_text()) == stored.request_count
            assert _number(page.get_by_test_id("errors").inner_text()) == stored.error_count
            assert _number(page.get_by_test_id("cost").inner_text()) == pytest.approx(
                stored.cost, abs=5e-5
            )
            assert _number(page.get_by_test_id("input-tokens").inner_text()) == (
                stored.input_tokens
            )
            assert stored.processing_time_p95 is not None
            assert _ms(page.get_by_test_id("p95").inner_text()) == pytest.approx(
                stored.processing_time_p95, abs=5e-4
            )
            assert page.get_by_test_id("level").inner_text() == (
                "fail" if stored.error_rate > store.settings.health_fail_rate else "warn"
            )
        finally:
            browser.close()
