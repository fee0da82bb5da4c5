"""Keeping what a prefork pool process inherits shared with the main process.

A pool process is forked from the worker's main process after everything the tasks run has
been imported there (Celery, kombu, SQLAlchemy, psycopg, pydantic, the store), so it starts
out sharing all of those pages copy-on-write and imports nothing of its own. CPython's cyclic
garbage collector would unshare them: a collection writes to the header of every object it
scans, so the first full collection in a pool process copies nearly every page of the
inherited heap into the child. :func:`gc.freeze` moves every object alive at that moment into
a permanent generation the collector never scans (the technique Instagram's prefork servers
use; CPython's documentation of ``gc.freeze`` recommends it before a ``fork`` without
``exec``). The objects a pool process makes are collected as usual.
"""

from __future__ import annotations

import gc


def freeze_before_fork() -> None:
    """Collect the garbage there is now, then freeze every object that survives.

    Called in the worker's main process once it is set up, before the pool forks; a pool
    process forked later (one replacing a killed one) inherits the same frozen objects. What
    is frozen is never collected, which is why the garbage goes first: what stays is the
    modules, classes and configuration the process keeps for its lifetime anyway.
    """
    gc.collect()
    gc.freeze()
