"""An agent that records a burst from a fresh tracker: ``python -m tests.faults.burst_agent``.

Reads its arguments as one JSON line on stdin (so that every agent of the scenario starts at
the same moment), then builds a real :class:`SessionTracker` from the environment's settings
and at once calls ``record`` ``events`` times in a plain loop, round-robin over its sessions,
with nothing in between (the arguments are made before the tracker): an agent replaying a
backlog, a batch job. Then it closes the tracker and prints one JSON line: what it sent per
session, its tracker's counters, the loop's and the close's seconds, its worst ``record``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from sessions.tracker import SessionTracker
from tests.faults.harness import Reference, event_values


def main() -> None:
    arguments = json.loads(sys.stdin.readline())
    sessions = [str(name) for name in arguments["sessions"]]
    offset, events = int(arguments["offset"]), int(arguments["events"])
    calls = []
    reference = Reference()
    for index in range(offset, offset + events):
        session_id = sessions[index % len(sessions)]
        error, input_tokens, output_tokens = event_values(index)
        calls.append((session_id, error, input_tokens, output_tokens))
        reference.add(session_id, error, input_tokens, output_tokens)
    began = time.monotonic()
    tracker = SessionTracker()
    started = time.monotonic()
    worst = 0.0
    clock = time.perf_counter
    for session_id, error, input_tokens, output_tokens in calls:
        before = clock()
        tracker.record(
            session_id,
            processing_time=0.01,
            error=error,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
        )
        worst = max(worst, clock() - before)
    recorded = time.monotonic()
    at_loop_end = asdict(tracker.stats)
    tracker.close(timeout=float(arguments["close_timeout"]))
    print(
        json.dumps(
            {
                "sent": events,
                "tracker_seconds": started - began,
                "loop_seconds": recorded - started,
                "close_seconds": time.monotonic() - recorded,
                "worst_record_us": worst * 1e6,
                "at_loop_end": at_loop_end,
                "stats": asdict(tracker.stats),
                "counts": {k: asdict(v) for k, v in reference.sessions.items()},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
