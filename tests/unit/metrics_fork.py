"""A worker's metrics across forked processes: ``python -m tests.unit.metrics_fork PORT``.

A process of its own, so that ``prometheus_client`` is first imported as in a worker: by
:func:`sessions.worker.metrics.start`, or before it (``--import-first``), as a plugin might. It
plays a worker's main process: starts the metrics, prints ``started``; on a line from stdin forks
two pool processes one after the other, each recording one apply and one sweep, then prints
``ready <files>``; on the next line stops and prints ``stopped <folder still there>``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

#: Events each pool process applies.
EVENTS = 10
#: Active sessions the n-th pool process counts after its sweep: the last one wins.
ACTIVE = (100, 101)


def pool_process(number: int, folder: Path) -> None:
    """What a pool process does, as the worker's signal handlers and tasks call it."""
    from sessions.records import ApplyResult, SweepResult
    from sessions.worker import metrics

    metrics.after_fork()
    applied = ApplyResult(applied=EVENTS, claimed=True, oldest_event_at=datetime.now(UTC))
    metrics.record_apply(applied, 0.01)
    ended = tuple(f"s-{n}" for n in range(number + 1))
    metrics.record_sweep(SweepResult(sweep="expire_idle", changed=ended), lambda: ACTIVE[number])
    # What a live gauge would leave behind; prometheus-client removes it for a dead process.
    (folder / f"gauge_livesum_{os.getpid()}.db").touch()
    metrics.process_exit()


def main() -> None:
    port = int(sys.argv[1])
    if "--import-first" in sys.argv:
        import prometheus_client  # noqa: F401

    from sessions.settings import Settings
    from sessions.worker import metrics

    metrics.start(Settings(metrics_port=port))
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    print("started", flush=True)
    sys.stdin.readline()
    for number in range(len(ACTIVE)):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                pool_process(number, folder)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"pool process {number} failed"
    print("ready", json.dumps(sorted(os.listdir(folder))), flush=True)
    sys.stdin.readline()
    metrics.stop()
    print("stopped", json.dumps(folder.exists()), flush=True)


if __name__ == "__main__":
    main()
