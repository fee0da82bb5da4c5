"""Celery wiring of the session pipeline, for `celery -A workers worker` and `... beat`.

Thin on purpose: the app reads ``celeryconfig``, and every task is one call into
:class:`sessions.store.SessionStore`.
"""

from __future__ import annotations

from workers.app import app, create_app

__all__ = ["app", "create_app"]
