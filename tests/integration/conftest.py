"""Fixtures of the store's integration tests beyond the shared ones in tests/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sessions.context_engine import ContextEngine
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.integration.support import reset


@pytest.fixture
def task_store(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> SessionStore:
    """The store the worker's tasks use, run in this process (retries without waiting)."""
    from sessions.worker import tasks

    monkeypatch.setattr(tasks, "_store", store)
    monkeypatch.setattr(tasks, "RETRY_BACKOFF_BASE", 0.0)
    return store


@pytest.fixture
def context_engine(task_store: SessionStore, settings: Settings) -> Iterator[ContextEngine]:
    """A ContextEngine whose writes are applied to ``task_store`` as soon as published (the
    tracker's publisher stands in for the broker and the worker)."""

    def apply_now(message: dict[str, Any]) -> None:
        task_store.apply(message)

    tracker = SessionTracker(settings, publisher=apply_now, store=task_store, spool=None)
    engine = ContextEngine(settings, tracker=tracker, store=task_store)
    asyncio.run(engine.initialize())
    yield engine
    tracker.close()


@pytest.fixture
def pg_store(postgres_url: str, settings: Settings) -> Iterator[SessionStore]:
    """An empty store on PostgreSQL only (for tests of real concurrent transactions)."""
    store = SessionStore(postgres_url, settings=settings)
    reset(store)
    yield store
    store.dispose()


@pytest.fixture
def another_store(settings: Settings) -> Iterator[Callable[[SessionStore], SessionStore]]:
    """Opens more stores (own engines, own connections) on the database of a given store."""
    opened: list[SessionStore] = []

    def open_store(store: SessionStore) -> SessionStore:
        other = SessionStore(store.url, settings=settings)
        opened.append(other)
        return other

    yield open_store
    for other in opened:
        other.dispose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the PostgreSQL variants of tests parametrized over both backends as ``postgres``."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("database_url") == "postgresql":
            item.add_marker(pytest.mark.postgres)
