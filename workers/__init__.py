"""``celery -A workers worker`` (and ``... beat``) from a checkout: the app of
:mod:`sessions.worker`, whose modules hold the worker's code.

This package is the repository's, not the distribution's: a wheel installs only ``sessions``
(``celery -A sessions.worker worker`` there), so it cannot shadow an application's own
``workers``.
"""

from __future__ import annotations

from sessions.worker.celery_app import app, create_app

__all__ = ["app", "create_app"]
