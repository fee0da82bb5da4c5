"""An agent with no database URL records, confirms and flushes against a running worker.

The agent is a fresh Python process whose environment names the Redis broker and nothing of the
database (no ``SESSIONS_DATABASE_URL``), started in an empty folder, so the ledger it could fall
back to (the default ``sqlite:///sessions.db``) does not exist. Its ``flush(wait=True)`` must
return only once the worker has committed every event, told so by the worker's marks on Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

from sessions.publisher import CeleryPublisher
from sessions.redis_confirming import confirmation_key
from sessions.settings import Settings
from sessions.store import SessionStore
from tests.support.services import require_postgres, require_redis, temporary_postgres_database
from tests.support.workers_harness import (
    REPO_ROOT,
    CeleryProcess,
    claimed_redis_db,
    service_environment,
    wait_until,
)

EVENTS = 1200
SESSIONS = 12

AGENT = f"""
import json, sys
from sessions import SessionTracker

with SessionTracker(max_batch_events=100) as tracker:
    for n in range({EVENTS}):
        tracker.record(f"agent-{{n % {SESSIONS}}}", processing_time=0.25, error=n % 4 == 0)
    tracker.flush(wait=True, timeout=120)
    print(json.dumps({{
        "confirmer": tracker._confirmations.confirmer.where,
        "sqlalchemy": "sqlalchemy" in sys.modules,
        "sent": tracker.stats.events_sent,
        "unconfirmed": tracker.stats.batches_unconfirmed,
    }}), flush=True)
    sys.stdin.readline()  # the test counts the database before the tracker closes
"""


def running_worker(stack: ExitStack, tmp_path: Path, name: str) -> tuple[str, str]:
    """A worker on a claimed Redis db and a fresh PostgreSQL database, ready; their URLs."""
    require_postgres()
    require_redis()
    url = stack.enter_context(temporary_postgres_database(name))
    broker = stack.enter_context(claimed_redis_db())
    env = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=url)
    worker = CeleryProcess("worker", ["worker", "--loglevel=INFO", "-c", "2"], env, tmp_path)
    stack.callback(worker.stop)
    worker.wait_for_log(r"@\S+ ready\.")
    return url, broker


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_an_agent_without_a_database_url_flushes_to_applied_events(tmp_path: Path) -> None:
    with ExitStack() as stack:
        url, broker = running_worker(stack, tmp_path, "sessions_credential_free")
        agent_env = service_environment(
            SESSIONS_BROKER_URL=broker, SESSIONS_SPOOL_DIR=str(tmp_path / "spool")
        )
        agent_env["PYTHONPATH"] = str(REPO_ROOT)
        assert not any(name.startswith("SESSIONS_DATABASE") for name in agent_env)
        folder = tmp_path / "agent"
        folder.mkdir()
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT],
            cwd=folder,
            env=agent_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stack.callback(agent.kill)
        assert agent.stdout is not None and agent.stdin is not None
        line = agent.stdout.readline()
        assert line, f"the agent failed:\n{agent.stderr.read() if agent.stderr else ''}"
        report = json.loads(line)

        # flush(wait=True) has returned: the database holds every event, right now.
        store = SessionStore(url, settings=Settings(database_url=url))
        stack.callback(store.dispose)
        totals = store.aggregate()
        assert totals.request_count == EVENTS
        assert totals.error_count == EVENTS // 4
        assert report == {
            "confirmer": f"the confirmations on Redis at {broker}",
            "sqlalchemy": False,
            "sent": EVENTS,
            "unconfirmed": 0,
        }
        agent.stdin.write("\n")
        agent.stdin.flush()
        assert agent.wait(timeout=60) == 0, agent.stderr.read() if agent.stderr else ""
        assert not (folder / "sessions.db").exists()


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_a_batch_set_aside_whole_is_marked_settled_too(tmp_path: Path) -> None:
    import redis

    with ExitStack() as stack:
        url, broker = running_worker(stack, tmp_path, "sessions_marked_dead_letter")
        batch_id = uuid.uuid4()
        publisher = CeleryPublisher(Settings(broker_url=broker))
        stack.callback(publisher.close)
        # Not a batch the store can decode (events is no list): set aside whole, its id claimed.
        publisher.publish_text(json.dumps({"batch_id": str(batch_id), "events": "none"}))
        client = redis.Redis.from_url(broker)
        stack.callback(client.close)
        wait_until(
            lambda: client.exists(confirmation_key(batch_id)) == 1,
            message="the dead-lettered batch marked settled",
        )
        store = SessionStore(url, settings=Settings(database_url=url))
        stack.callback(store.dispose)
        assert store.applied_batch_ids([batch_id]) == {batch_id}
        assert len(store.dead_letters()) == 1
