"""The wire contract with a client no one here wrote: examples/node/record_sessions.js.

The script publishes batches through the npm package celery-node (its Redis broker, Celery's
task protocol 2) to the queue a real worker consumes. Every batch it sent is checked against
the shipped schema; the worker must apply exactly the events the schema accepts (the totals
to the last bit, each batch once although it was sent twice) and dead-letter the one it
refuses, with the reason naming the field.

celery-node is installed from examples/node's lock file into ``.cache/celery-node`` (ignored by
git), once: later runs reuse it while the lock file is unchanged. Without node and npm, or
without the npm registry, the test skips, saying why; with ``SESSIONS_REQUIRE_SERVICES=1`` (CI)
it fails instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from sessions.rules import MAX_PROCESSING_TIME
from sessions.wire import shipped_schema
from tests.support.services import missing_service
from tests.support.workers_harness import (
    REPO_ROOT,
    run_to_completion,
    running_pipeline,
    service_environment,
    wait_until,
)

EXAMPLE = REPO_ROOT / "examples" / "node"
#: Where celery-node is installed for the tests (``npm ci --prefix``), kept between runs.
CACHE = REPO_ROOT / ".cache" / "celery-node"
#: A hang guard for ``npm ci`` only: each of its fetches has a timeout of its own.
NPM_TIMEOUT = 600


def install_celery_node() -> Path:
    """The ``node_modules`` holding celery-node as examples/node/package-lock.json pins it.

    Skips (fails, with ``SESSIONS_REQUIRE_SERVICES=1``) when node or npm is missing or the
    install fails, e.g. because the npm registry cannot be reached.
    """
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            missing_service(f"{tool} is not on PATH (the celery-node example needs Node.js)")
    lock = EXAMPLE / "package-lock.json"
    cached_lock, modules = CACHE / "package-lock.json", CACHE / "node_modules"
    installed = (modules / "celery-node" / "package.json").is_file()
    if installed and cached_lock.is_file() and cached_lock.read_bytes() == lock.read_bytes():
        return modules
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(EXAMPLE / name, CACHE / name)
    command = [
        "npm", "ci", "--prefix", str(CACHE), "--ignore-scripts", "--no-audit", "--no-fund",
        "--no-update-notifier", "--fetch-retries=1", "--fetch-timeout=60000",
    ]  # fmt: skip
    try:
        installed = subprocess.run(command, capture_output=True, text=True, timeout=NPM_TIMEOUT)
    except subprocess.TimeoutExpired:
        missing_service(f"`npm ci` did not finish in {NPM_TIMEOUT} s (npm registry unreachable?)")
    if installed.returncode != 0:
        output = (installed.stderr or installed.stdout).strip().splitlines()[:4]
        missing_service(
            "`npm ci` could not install celery-node (is the npm registry reachable?): "
            + " | ".join(output)
        )
    return modules


@pytest.fixture(scope="module")
def node_modules() -> Path:
    return install_celery_node()


def expected_totals(batches: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each session's totals from the events of ``batches`` (each batch id once)."""
    counters = "request_count error_count total_processing_time input_tokens output_tokens cost"
    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: dict.fromkeys(counters.split(), 0) | {"status": "active"}
    )
    for batch in {batch["batch_id"]: batch for batch in batches}.values():
        for event in batch["events"]:
            session = totals[event["session_id"]]
            if event["kind"] == "record":  # a field left out has the contract's default
                session["request_count"] += event.get("counts_request", True)
                session["error_count"] += event.get("error", False)
                session["total_processing_time"] += event.get("processing_time", 0.0)
                session["input_tokens"] += event.get("input_tokens", 0)
                session["output_tokens"] += event.get("output_tokens", 0)
                session["cost"] += event.get("cost", 0.0)
            elif event["kind"] == "end":
                session["status"] = event.get("status", "completed")
    return dict(totals)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_a_node_client_on_celery_node_records_exactly_and_its_bad_event_is_dead_lettered(
    node_modules: Path, tmp_path: Path
) -> None:
    validator = Draft202012Validator(
        shipped_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    prefix = f"node-{uuid.uuid4().hex[:8]}"
    with running_pipeline(tmp_path) as pipeline:
        environment = service_environment(
            SESSIONS_BROKER_URL=pipeline.settings.broker_url, NODE_PATH=str(node_modules)
        )
        run = run_to_completion(
            [
                shutil.which("node") or "node",
                str(EXAMPLE / "record_sessions.js"),
                "--prefix",
                prefix,
                "--twice",
                "--malformed",
            ],
            env=environment,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        sent = [json.loads(line) for line in run.stdout.splitlines()]
        assert len(sent) >= 6, run.stdout

        # What the contract says of each event: all valid but one, whose processing_time is -1.
        assert all(validator.is_valid({**batch, "events": []}) for batch in sent)
        invalid = [
            (batch, index)
            for batch in sent
            for index, event in enumerate(batch["events"])
            if not validator.is_valid({**batch, "events": [event]})
        ]
        ((bad_batch, bad_index),) = invalid
        assert bad_batch["events"][bad_index]["processing_time"] == -1
        applied = [
            {
                **batch,
                "events": [e for i, e in enumerate(batch["events"]) if (batch, i) not in invalid],
            }
            for batch in sent
        ]

        # Each batch was sent twice: the worker receives both copies and applies one.
        ids = {uuid.UUID(batch["batch_id"]) for batch in sent}
        wait_until(
            lambda: (
                pipeline.worker.count(r"Task sessions\.ingest\[\S+\] succeeded") >= 2 * len(sent)
            ),
            message="the worker to handle every message celery-node published",
        )
        assert pipeline.store.applied_batch_ids(ids) == ids

        for session_id, expected in expected_totals(applied).items():
            record = pipeline.store.get(session_id)
            assert record is not None, session_id
            assert record.user_id == f"{prefix}-user"
            assert record.metadata == {"agent": "node", "sdk": "celery-node"}
            actual = {name: getattr(record, name) for name in expected}
            assert actual == expected, session_id  # exact: every value is a multiple of 1/8

        letters = [
            letter
            for letter in pipeline.store.dead_letters()
            if letter.batch_id == bad_batch["batch_id"]
        ]
        assert [letter.reason for letter in letters] == [
            f"events[{bad_index}]: record.processing_time: must be a finite number of seconds "
            f"from 0 to {MAX_PROCESSING_TIME:g}"
        ]
        assert json.loads(letters[0].payload) == bad_batch["events"][bad_index]
