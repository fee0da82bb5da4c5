"""A worker or beat refuses to start on a database that answers but cannot be used.

Refusing is a clean exit (status 78, ``EX_CONFIG``) with one CRITICAL line naming the
database (password masked) and what is wrong, never a traceback and never ``ready``: a
dialect the store does not support (MariaDB), a schema at a revision this code does not
know, a schema that cannot be migrated. A database that does not answer is another matter:
the worker starts, waits, and migrates it once it is back.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from sessions.cli import app
from sessions.events import Batch, RecordEvent
from sessions.publisher import CeleryPublisher
from sessions.settings import Settings, get_settings
from sessions.store import SessionStore
from sessions.worker.celery_app import REFUSED_EXIT_CODE
from tests.support.services import (
    POSTGRES_ADMIN_URL,
    require_postgres,
    require_redis,
    temporary_mariadb_database,
    temporary_postgres_database,
)
from tests.support.workers_harness import (
    DEADLINE,
    CeleryProcess,
    TcpProxy,
    claimed_redis_db,
    service_environment,
    start_worker,
    wait_until,
)


def _start(command: str, database_url: str, logs: Path) -> CeleryProcess:
    """``celery -A workers <command>`` on ``database_url`` and a broker that needs no server."""
    environment = service_environment(
        SESSIONS_DATABASE_URL=database_url,
        SESSIONS_BROKER_URL="filesystem://",
        SESSIONS_BROKER_DIR=str(logs / "broker"),
    )
    arguments = ["--loglevel=INFO"]
    if command == "worker":
        arguments += ["--concurrency=1", f"--hostname=refused-{uuid.uuid4().hex[:8]}@%h"]
    else:
        arguments += [f"--schedule={logs / ('beat-schedule-' + uuid.uuid4().hex[:6])}"]
    return CeleryProcess(command, [command, *arguments], environment, logs)


def _refused(process: CeleryProcess) -> str:
    """Wait for ``process`` to exit; its log, after checking it refused cleanly."""
    try:
        process.process.wait(timeout=DEADLINE * 2)
    except subprocess.TimeoutExpired:
        process.stop()
        raise AssertionError(
            f"{process.name} did not refuse to start:\n{process.log[-3000:]}"
        ) from None
    log = process.log
    process.stop()
    assert process.process.returncode == REFUSED_EXIT_CODE, log[-3000:]
    assert "CRITICAL" in log and "refusing to start" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert " ready." not in log, log[-3000:]  # a worker never said it was consuming
    return log


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    with temporary_mariadb_database("sessions_refused") as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_a_mariadb_database_is_refused_before_anything_is_written(
    tmp_path: Path, mariadb_url: str, command: str
) -> None:
    with_password = make_url(mariadb_url).set(password="s3cret").render_as_string(False)
    log = _refused(_start(command, with_password, tmp_path))
    assert "s3cret" not in log
    assert "is mysql, which the store does not support" in log
    assert make_url(with_password).render_as_string(hide_password=True) in log
    # Refused before migrating: not a half-made schema left behind.
    engine = create_engine(mariadb_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    require_postgres()
    with temporary_postgres_database("sessions_refused") as url:
        yield url


@pytest.mark.slow
def test_a_schema_at_a_revision_this_code_does_not_know_is_refused(
    tmp_path: Path, postgres_database: str
) -> None:
    store = SessionStore(postgres_database, settings=Settings())
    store.upgrade()
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfacade01'"))
    store.dispose()
    log = _refused(_start("worker", postgres_database, tmp_path))
    masked = make_url(postgres_database).render_as_string(hide_password=True)
    assert f"the schema of the database at {masked} is at revision f00dfacade01" in log
    assert "Can't locate revision" in log


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_a_schema_that_cannot_be_migrated_is_refused_after_its_attempts(
    tmp_path: Path, postgres_database: str, command: str
) -> None:
    # Someone's table in the way: the first migration cannot create `sessions`.
    engine = create_engine(postgres_database)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE sessions (unrelated integer)"))
    engine.dispose()
    log = _refused(_start(command, postgres_database, tmp_path))
    assert "is at revision none, not at the newest" in log
    assert "DuplicateTable" in log
    assert log.count("trying again") == 2, log[-3000:]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_a_worker_started_while_the_database_is_away_migrates_it_once_it_is_back(
    tmp_path: Path, postgres_database: str
) -> None:
    require_redis()
    server = make_url(POSTGRES_ADMIN_URL)
    proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432)
    through_proxy = (
        make_url(postgres_database).set(port=proxy.port).render_as_string(hide_password=False)
    )
    try:
        proxy.cut()
        with claimed_redis_db() as broker:
            environment = service_environment(
                SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=through_proxy
            )
            worker = start_worker(environment, tmp_path, concurrency=1)
            try:
                assert "cannot migrate now" in worker.log
                settings = Settings(broker_url=broker, database_url=postgres_database)
                batch = Batch(
                    events=(
                        RecordEvent(
                            session_id="came-back", at=datetime.now(UTC), processing_time=0.1
                        ),
                    )
                )
                publisher = CeleryPublisher(settings)
                try:
                    publisher(batch.to_message())
                finally:
                    publisher.close()
                wait_until(
                    lambda: worker.count("database unavailable") >= 1,
                    message="the batch to meet the database away",
                )
                proxy.restore()
                store = SessionStore(postgres_database, settings=settings)
                try:
                    # Its schema exists only once a pool process has migrated it.
                    wait_until(
                        lambda: (
                            "is at the newest schema" in worker.log
                            and store.applied_batch_ids([batch.batch_id]) == {batch.batch_id}
                        ),
                        timeout=DEADLINE * 2,
                        message="the batch applied once the database answered",
                    )
                    record = store.get("came-back")
                    assert record is not None and record.request_count == 1
                finally:
                    store.dispose()
                assert worker.process.poll() is None
                assert "is at the newest schema" in worker.log
            finally:
                worker.stop()
    finally:
        proxy.close()


# -- the same refusals from the `sessions` command --------------------------------------------


def _sessions(arguments: list[str], url: str, monkeypatch: pytest.MonkeyPatch) -> Result:
    monkeypatch.setenv("SESSIONS_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, arguments)
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("command", [["db", "upgrade"], ["stats"], ["worker"]])
def test_the_cli_refuses_an_unsupported_database_before_connecting(
    monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # Port 1: nothing listens there, so the refusal cannot come from a connection attempt.
    result = _sessions(command, "mysql+pymysql://agent:s3cret@127.0.0.1:1/x", monkeypatch)
    output = " ".join(result.output.split())
    # `sessions worker` exits as the worker itself would (EX_CONFIG, for supervisors).
    assert result.exit_code == (78 if command == ["worker"] else 2), result.output
    assert "mysql+pymysql://agent:***@127.0.0.1:1/x is mysql, which the store does not" in output
    assert "s3cret" not in output


def test_db_upgrade_of_a_schema_this_code_does_not_know_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'ahead.db'}"
    store = SessionStore(url, settings=Settings())
    store.upgrade()
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfacade01'"))
    store.dispose()
    result = _sessions(["db", "upgrade"], url, monkeypatch)
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "cannot migrate the database at sqlite:///" in output
    assert "f00dfacade01" in output
