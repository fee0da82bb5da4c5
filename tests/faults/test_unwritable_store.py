"""Scenario 11: a database that refuses the worker's writes, then is repaired.

A real worker (prefork, on a private Redis and a private PostgreSQL cluster) connects as a
role of its own. Its batch meets a database that refuses to store it, in three ways an
operator can cause: the role's INSERT privilege on the ledger revoked, the ledger table
dropped, the database made read-only (``default_transaction_read_only``, its connections
ended, as after a failover to a standby). Applying fails, and so does dead-lettering (a dead
letter claims its batch id in the ledger too), so the batch belongs in none of the two
tables: it must stay on the queue. The batch is published straight to the broker (no
tracker, so nothing republishes it): if the worker acknowledged it, it would be gone. Once
the fault is repaired, the batch must be applied, exactly once, and nothing dead-lettered.

The worker runs with test code that shortens its retry backoff
(``--include tests.faults.fast_retries``), so the dead-letter attempt comes within seconds.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import ledger_table
from tests.faults.harness import (
    PREFORK,
    Fleet,
    Monitor,
    Reference,
    compare,
    locate_batches,
    record_outcome,
    recorded_batch,
    service_environment,
    wait_until,
)
from tests.faults.servers import PrivateRedis

pytestmark = [pytest.mark.slow]

#: Times the worker must have put the batch back (dead letter refused) before the repair.
REFUSALS_BEFORE_REPAIR = 3


def _end_connections(admin: Engine, role: str) -> None:
    """End the worker's connections, so that new ones see the database's new defaults."""
    with admin.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"),
            {"role": role},
        )


def _faults(role: str, database: str) -> dict[str, tuple[str, str]]:
    """Each fault's statements: (break, repair)."""
    grant = f'GRANT SELECT, INSERT, UPDATE, DELETE ON applied_batches TO "{role}"'
    return {
        "revoked": (f'REVOKE INSERT ON applied_batches FROM "{role}"', grant),
        "dropped": ("DROP TABLE applied_batches", grant),
        "read_only": (
            f'ALTER DATABASE "{database}" SET default_transaction_read_only = on',
            f'ALTER DATABASE "{database}" RESET default_transaction_read_only',
        ),
    }


@pytest.mark.parametrize("fault", ["revoked", "dropped", "read_only"])
def test_a_batch_the_database_refuses_stays_queued_until_the_fault_is_repaired(
    tmp_path: Path,
    fault_database_url: str,
    redis_server: PrivateRedis,
    fault: str,
) -> None:
    began = time.monotonic()
    url = fault_database_url
    database = make_url(url).database
    assert database is not None
    role = f"worker_{uuid.uuid4().hex[:8]}"
    owner = SessionStore(url, settings=Settings())
    owner.upgrade()
    owner.dispose()
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        connection.execute(
            text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
        )
        connection.execute(text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'))
    worker_url = make_url(url).set(username=role).render_as_string(hide_password=False)
    broker = redis_server.url
    environment = service_environment(SESSIONS_BROKER_URL=broker, SESSIONS_DATABASE_URL=worker_url)
    settings = Settings(broker_url=broker, database_url=url)
    breaking, repairing = _faults(role, database)[fault]
    reference = Reference()
    session = f"unwritable-{fault}"
    redis_client = redis_server.client()
    with Fleet(environment, tmp_path) as fleet, Monitor(url) as monitor:
        worker = fleet.worker(pool=PREFORK, include="tests.faults.fast_retries")

        with admin.connect() as connection:
            connection.execute(text(breaking))
        if fault == "read_only":
            _end_connections(admin, role)
        batch = recorded_batch(reference, [session], 20, 0)
        publisher = CeleryPublisher(settings)
        try:
            publisher(batch.to_message())
        finally:
            publisher.close()

        refused = f"batch {batch.batch_id}: neither applied nor set aside"
        wait_until(
            lambda: worker.count(refused) >= REFUSALS_BEFORE_REPAIR,
            timeout=60,
            message=f"the worker to put the batch back {REFUSALS_BEFORE_REPAIR} times",
        )

        # Still in the broker (queued, or held by the worker for its retry countdown), and
        # in neither table.
        def where() -> str:
            return locate_batches(redis_client, [batch.batch_id])[str(batch.batch_id)]

        wait_until(
            lambda: where() != "nowhere in the broker",
            timeout=10,
            message="the refused batch to be seen in the broker",
        )
        located = where()
        assert monitor.dead_letter_count() == 0

        with admin.connect() as connection:
            if fault == "dropped":
                ledger_table.create(connection)
            connection.execute(text(repairing))
        if fault == "read_only":
            _end_connections(admin, role)

        wait_until(
            lambda: monitor.ledger_count() == 1,
            timeout=60,
            message="the batch applied once the fault was repaired",
        )
        wait_until(
            lambda: (
                redis_client.llen("sessions.events") == 0  # type: ignore[attr-defined]
                and redis_client.hlen("unacked") == 0
            ),  # type: ignore[attr-defined]
            timeout=30,
            message="the broker to hold nothing more",
        )
        outcome = compare(reference, url)
        refusals = worker.count(refused)
        row = record_outcome(f"11 database refuses writes: {fault}", outcome, began)
        row.dead_lettered = monitor.dead_letter_count()
        row.notes.append(
            f"{fault}: the batch was put back {refusals} times (dead letter refused too), "
            f"was {located} in the broker meanwhile, and was applied once after the repair"
        )

        assert worker.process.poll() is None, worker.log[-3000:]
        assert monitor.dead_letter_count() == 0
        assert monitor.ledger_count() == 1
        assert outcome.exact, outcome.describe()
    admin.dispose()
