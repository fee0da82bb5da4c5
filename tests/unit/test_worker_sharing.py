"""The worker's main process freezes its objects out of the garbage collector's reach once it
is set up, before the pool forks (sessions/worker/sharing.py): pool processes then keep sharing
the pages they inherit. What that saves is measured by ``bench.worker_memory``, not here."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from celery.signals import celeryd_after_setup

from sessions.worker import celery_app, metrics


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # this test process goes on collecting as before


def test_the_main_process_freezes_its_objects_once_set_up(
    unfrozen: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    monkeypatch.setattr(celery_app, "_prepare", lambda: order.append("migrated"))
    monkeypatch.setattr(metrics, "start", lambda settings: order.append("metrics started"))
    assert gc.get_freeze_count() == 0

    # What Celery sends in the main process, before the pool's bootstep forks its processes.
    celeryd_after_setup.send(sender="test@host", instance=None, conf=celery_app.app.conf)

    assert order == ["migrated", "metrics started"]
    # Every module, class and setting the worker holds is in the permanent generation ...
    assert gc.get_freeze_count() > 10_000
    # ... and what is made afterwards, in a pool process, is collected as usual.
    cycle = Cycle()
    cycle.me = cycle
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None


class Cycle:
    me: Cycle | None = None
