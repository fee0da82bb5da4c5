"""An agent that records until it is SIGKILLed: ``python -m tests.faults.killed_agent '<json>'``.

It records into one session at a steady ``rate`` through a real :class:`SessionTracker` with
the shipped flush interval, and after every ``record`` writes two counters to a shared file
(``struct`` ``<QQ``): the events recorded so far and the events its tracker had published by
then. The scenario reads them at the moment it kills the process: the published count is a
floor of what must be applied, the recorded count a ceiling.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import time
from pathlib import Path

from sessions.settings import Settings
from sessions.tracker import SessionTracker

COUNTERS = struct.Struct("<QQ")


def main(arguments: dict[str, object]) -> None:
    settings = Settings(
        broker_url=str(arguments["broker_url"]),
        database_url=str(arguments["database_url"]),
        spool_dir=Path(str(arguments["spool_dir"])),
    )
    session_id = str(arguments["session_id"])
    rate = float(arguments["rate"])  # type: ignore[arg-type]
    path = Path(str(arguments["counters"]))
    path.write_bytes(bytes(COUNTERS.size))
    with path.open("r+b") as file:
        counters = mmap.mmap(file.fileno(), COUNTERS.size)
    tracker = SessionTracker(settings)
    print("ready", flush=True)
    began = time.monotonic()
    recorded = 0
    while True:
        due = int((time.monotonic() - began) * rate)
        while recorded < due:
            tracker.record(session_id, processing_time=0.01)
            recorded += 1
            counters[:] = COUNTERS.pack(recorded, tracker.stats.events_sent)
        time.sleep(0.001)  # pacing the load until the SIGKILL comes


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
