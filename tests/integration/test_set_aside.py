"""``sessions.set_aside``: a public task, so its arguments are checked and its reason labelled.

Review of issue 12, finding 3: ``send_task('sessions.set_aside', args=[{'a': 1}, ['r']])``
retried forever, and any publisher could write a dead letter with any reason.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery.exceptions import Retry

from sessions.store import SessionStore
from sessions.worker import tasks

NOTHING = {"applied": 0, "duplicate": 0, "rejected": 0}


def _run(*args: Any, retries: int = 0) -> Any:
    """Run set_aside as the worker does for one delivery (``retries`` earlier attempts)."""
    tasks.set_aside.push_request(id="set-aside-1", retries=retries)
    try:
        return tasks.set_aside.run(*args)
    finally:
        tasks.set_aside.pop_request()


@pytest.mark.parametrize(
    "args", [({"a": 1}, ["r"]), ("junk", ["r"]), (None, "reason"), (b"junk", "reason")]
)
def test_arguments_that_are_not_strings_are_refused_once_and_not_retried(
    task_store: SessionStore, caplog: pytest.LogCaptureFixture, args: tuple[Any, Any]
) -> None:
    with caplog.at_level(logging.ERROR, logger="sessions.worker.tasks"):
        assert _run(*args) == NOTHING
    assert "sessions.set_aside refused its arguments, wrote nothing" in caplog.text
    assert task_store.dead_letters() == []


def test_the_stored_reason_says_who_reported_it(task_store: SessionStore) -> None:
    assert _run("this is not json {", "why")["rejected"] == 1
    (letter,) = task_store.dead_letters()
    assert letter.reason == "reported by the worker's envelope guard: why"
    assert letter.payload == '"this is not json {"'  # as JSON text


def test_a_long_reason_is_cut(task_store: SessionStore) -> None:
    _run("x", "y" * 10_000)
    (letter,) = task_store.dead_letters()
    assert len(letter.reason) < 2200 and letter.reason.endswith("of 10000 bytes]")


def test_an_error_that_is_no_outage_is_retried_a_bounded_number_of_times(
    task_store: SessionStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(payload: Any, reason: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(task_store, "dead_letter", broken)
    monkeypatch.setattr(tasks, "retry_later", lambda task, exc, countdown: Retry())
    with pytest.raises(Retry):
        _run("junk", "why", retries=tasks.UNEXPECTED_ERROR_RETRIES - 1)
    with caplog.at_level(logging.ERROR, logger="sessions.worker.tasks"):
        assert _run("junk", "why", retries=tasks.UNEXPECTED_ERROR_RETRIES) == NOTHING
    assert "could not be set aside in 6 attempts, dropped (RuntimeError: a bug)" in caplog.text
