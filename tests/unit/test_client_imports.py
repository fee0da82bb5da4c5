"""What an agent that records imports: the client and kombu, never Celery, the store's, the
worker's or the dashboard's dependencies (issue 13). Each check runs in a fresh interpreter,
since this test process has imported everything already. How long the imports take is
measured in ``bench.client_start``, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.client_start import FORBIDDEN  # the bench reports on the same list
from tests.support.workers_harness import run_to_completion

REPO_ROOT = Path(__file__).resolve().parents[2]

#: What an agent script starts with: ``loaded()``, the forbidden modules it has loaded (the
#: list comes as its first argument).
LOADED = """
    import sys

    FORBIDDEN = set(sys.argv[1].split(","))

    def loaded():
        return sorted(
            {f for f in FORBIDDEN for name in sys.modules if name == f or name.startswith(f + ".")}
        )

"""

AGENT = LOADED + """
    import json

    seen = {}
    from sessions import SessionTracker

    seen["import"] = loaded()
    # Its settings from the environment, as an agent's are (see _run's SESSIONS_* variables;
    # confirmation off: the in-memory broker carries no workers' marks).
    tracker = SessionTracker()
    seen["construction"] = loaded()
    tracker.create("s-1", user_id="u-1", metadata={"model": "m", "tags": ["a"]})
    tracker.record("s-1", processing_time=0.1)
    tracker.end("s-1", "completed")
    tracker.close()  # publishes the batch through kombu to the in-memory broker
    seen["publish"] = loaded()
    seen["batches_sent"] = tracker.stats.batches_sent
    seen["broker_url"] = tracker.settings.broker_url
    # Neither pydantic (the client checks plainly valid arguments and settings by the rules
    # themselves: sessions.plain, sessions.client_settings) nor SQLite (the spool's, opened
    # only once a batch must wait there) is loaded on the way.
    heavy = {"pydantic", "pydantic_core", "pydantic_settings", "sessions.events", "sqlite3"}
    seen["light"] = sorted(heavy & set(sys.modules))
    print(json.dumps(seen))
"""


def _run(code: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_to_completion(
        [sys.executable, "-c", textwrap.dedent(code), *arguments],
        cwd=cwd,
        env={
            "PYTHONPATH": str(REPO_ROOT),
            "XDG_CACHE_HOME": str(cwd),
            "PATH": "/usr/bin:/bin",
            "SESSIONS_BROKER_URL": "memory://",
            "SESSIONS_CONFIRM_TIMEOUT_SECONDS": "0",
        },
    )


def test_recording_imports_no_store_worker_or_dashboard(tmp_path: Path) -> None:
    agent = _run(AGENT, ",".join(FORBIDDEN), cwd=tmp_path)
    assert agent.returncode == 0, agent.stderr
    seen = json.loads(agent.stdout)
    assert seen == {
        "import": [],
        "construction": [],
        "publish": [],
        "batches_sent": 1,
        "broker_url": "memory://",
        "light": [],
    }, seen


def test_the_worker_builds_the_event_models_before_its_pool_forks(tmp_path: Path) -> None:
    code = """
        import json
        import sessions.worker.tasks  # what the worker's main process imports before forking
        from sessions import decoding, events
        print(json.dumps([
            model.__name__
            for model in (
                events.RecordEvent, events.Batch, decoding.WireBatch, decoding.RejectedEvent,
                decoding.DecodedBatch,
            )
            if not model.__pydantic_complete__
        ] + ([] if decoding._event_adapter.pydantic_complete else ["the event adapter"])))
    """
    worker = _run(code, cwd=tmp_path)
    assert worker.returncode == 0, worker.stderr
    assert json.loads(worker.stdout) == []


ENGINE_WRITES = LOADED + """
    import asyncio, json

    from sessions import ContextEngine
    from sessions.settings import Settings

    async def main():
        seen = {"import": loaded()}
        # No database URL is needed (the default, a SQLite file here, is never opened).
        engine = ContextEngine(Settings(broker_url="memory://", confirm_timeout_seconds=0))
        await engine.initialize()
        seen["initialize"] = loaded()
        await engine.update_session("s-1", increment_requests=True, add_processing_time=0.1)
        await engine.add_conversation_message("s-1", "user", "hello?")
        await engine.add_conversation_message("s-1", "assistant", "hello.")
        await engine.end_session("s-1")
        seen["writes"] = loaded()
        # The first read opens (and migrates) the store: only now does SQLAlchemy load. (The
        # history's read does not wait for the workers, of which there are none here.)
        history = await engine.get_conversation_history("s-1")
        seen["read"] = [message.content for message in history]
        seen["after_read"] = "sqlalchemy" in sys.modules
        await engine.close()  # publishes the batch through kombu to the in-memory broker
        seen["events_sent"] = engine.tracker.stats.events_sent
        print(json.dumps(seen))

    asyncio.run(main())
"""


def test_context_engine_writes_import_no_store_and_its_first_read_opens_one(
    tmp_path: Path,
) -> None:
    agent = _run(ENGINE_WRITES, ",".join(FORBIDDEN), cwd=tmp_path)
    assert agent.returncode == 0, agent.stderr
    seen = json.loads(agent.stdout)
    assert seen == {
        "import": [],
        "initialize": [],
        "writes": [],
        # one request recorded, two messages, the request the turn infers, the end
        "events_sent": 5,
        "read": ["hello?", "hello."],  # the engine's own, not applied yet
        "after_read": True,
    }, seen
    assert (tmp_path / "sessions.db").exists()  # the read's store, opened in the agent's cwd


def test_a_tracker_that_confirms_imports_the_store_only_once_it_has_something_to_confirm(
    tmp_path: Path,
) -> None:
    code = """
        import sys
        from sessions import SessionTracker
        from sessions.settings import Settings

        tracker = SessionTracker(Settings(broker_url="memory://"))  # confirmation on
        print("sqlalchemy" in sys.modules, "sessions.store" in sys.modules)
        tracker.close()
    """
    agent = _run(code, cwd=tmp_path)
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout.split() == ["False", "False"]


def test_the_package_imports_nothing_until_a_name_is_used(tmp_path: Path) -> None:
    code = """
        import sys
        import sessions.outbox  # a module of the standard library only

        print(sorted({m.split(".")[0] for m in sys.modules} & {"celery", "kombu", "pydantic",
            "sqlalchemy"}))
        from sessions import SessionRecord  # and a name imports its own module, no more
        print("sessions.records" in sys.modules, "sessions.store" in sys.modules)
    """
    agent = _run(code, cwd=tmp_path)
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout.splitlines() == ["[]", "True False"]
