"""The worker side of the pipeline: the Celery app, its tasks, configuration and guards.

``celery -A sessions.worker worker`` (and ``... beat``) runs it from an installed package;
a checkout's top-level ``workers`` package re-exports it for ``celery -A workers worker``.
It needs the ``worker`` extra (``pip install '.[worker]'`` in the checkout), which brings Celery.

:data:`app` and :func:`create_app` are imported on first use (PEP 562), so that
``from sessions.worker import config`` (the configuration, read by ``sessions schema`` too)
or ``metrics`` does not build the app, migrate nothing and install no guard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sessions.worker.celery_app import app, create_app

__all__ = ["app", "create_app"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'sessions.worker' has no attribute {name!r}")
    value = getattr(importlib.import_module("sessions.worker.celery_app"), name)
    globals()[name] = value  # found directly from now on
    return value
