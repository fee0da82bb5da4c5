"""The pipeline's Celery configuration, for ``app.config_from_object("celeryconfig")`` from a
checkout: every name of :mod:`sessions.worker.config`, where it is written.

This module is the repository's, not the distribution's: a wheel installs only ``sessions``,
so it cannot shadow an application's own ``celeryconfig``.
"""

from __future__ import annotations

from sessions.worker.config import *  # noqa: F403
