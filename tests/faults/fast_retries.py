"""Test code loaded into a worker for scenario 11: ``--include tests.faults.fast_retries``.

It shortens the ingest task's retry backoff (first countdown 0.05 s, at most 0.5 s instead of
1 s doubling to 300 s), so that a batch reaches its dead-letter attempt (after
``UNEXPECTED_ERROR_RETRIES`` retries) in about a second instead of half a minute. What is
retried, dead-lettered or put back on the queue is the product's own logic, unchanged.
"""

from __future__ import annotations

from sessions.worker import tasks

tasks.RETRY_BACKOFF_BASE = 0.05
tasks.RETRY_BACKOFF_MAX = 0.5
