"""An agent that records until it is SIGKILLed: ``python -m tests.faults.killed_agent '<json>'``.

It records into one session at a steady ``rate`` through a real :class:`SessionTracker` with
the shipped flush interval, and keeps three counters in a shared file (``struct`` ``<QQQ``):

* ``recorded``: events recorded so far, and ``published``: the events its tracker had
  published by then (``stats.events_sent``), both written by the recording loop after every
  ``record``;
* ``handed``: events in every publish the tracker *began*, written by its publisher thread
  before the message goes to the broker.

The scenario reads them once the process is dead: ``published`` is a floor of what must be
applied, ``handed`` a ceiling of what can be (nothing else ever reached the broker).
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import threading
import time
from pathlib import Path

from sessions.publisher import CeleryPublisher
from sessions.settings import Settings
from sessions.tracker import SessionTracker

#: recorded, published, handed (see the module docstring).
COUNTERS = struct.Struct("<QQQ")
#: The counters the recording loop writes, at the start of the file ...
LOOP_SLOTS = struct.Struct("<QQ")
#: ... and the one the publisher thread writes, after them.
HANDED_SLOT = struct.Struct("<Q")


class CountingPublisher(CeleryPublisher):
    """The real publisher, noting the events of each publish before it begins."""

    def __init__(self, settings: Settings, counters: mmap.mmap):
        super().__init__(settings)
        self.counters = counters
        self.handed = 0
        self.counting = threading.Lock()

    def publish_text(self, text: str) -> None:
        with self.counting:
            self.handed += len(json.loads(text)["events"])
            self.counters[LOOP_SLOTS.size : COUNTERS.size] = HANDED_SLOT.pack(self.handed)
        super().publish_text(text)


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
    tracker = SessionTracker(settings, publisher=CountingPublisher(settings, counters))
    print("ready", flush=True)
    began = time.monotonic()
    recorded = 0
    while True:
        due = int((time.monotonic() - began) * rate)
        while recorded < due:
            tracker.record(session_id, processing_time=0.01)
            recorded += 1
            counters[: LOOP_SLOTS.size] = LOOP_SLOTS.pack(recorded, tracker.stats.events_sent)
        time.sleep(0.001)  # pacing the load until the SIGKILL comes


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
