"""One agent process for the hot-rows scenario: ``python -m tests.faults.producer '<json>'``.

It builds a real :class:`SessionTracker` from the given broker and database, prints ``ready``,
waits for a line on stdin (so that every producer starts at the same moment), records its
events round-robin over the given sessions, closes the tracker (which publishes everything),
and prints one JSON line: what it sent per session, its tracker's counters, and its worst
``record`` call.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from sessions.settings import Settings
from sessions.tracker import SessionTracker
from tests.faults.harness import Reference, ReferenceRecorder


def main(arguments: dict[str, object]) -> None:
    settings = Settings(
        broker_url=str(arguments["broker_url"]), database_url=str(arguments["database_url"])
    )
    sessions = list(arguments["sessions"])  # type: ignore[call-overload]
    events = int(arguments["events"])  # type: ignore[call-overload]
    offset = int(arguments["offset"])  # type: ignore[call-overload]
    tracker = SessionTracker(
        settings,
        max_batch_events=int(arguments["batch"]),  # type: ignore[call-overload]
        flush_interval=0.01,
    )
    reference = Reference()
    recorder = ReferenceRecorder(tracker, reference)
    print("ready", flush=True)
    sys.stdin.readline()
    began = time.monotonic()
    for index in range(offset, offset + events):
        recorder.record(sessions[index % len(sessions)], index)
    tracker.close(timeout=60)
    print(
        json.dumps(
            {
                "sent": recorder.sent,
                "worst_record_us": recorder.worst * 1e6,
                "seconds": time.monotonic() - began,
                "counts": {k: asdict(v) for k, v in reference.sessions.items()},
                "stats": asdict(tracker.stats),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
