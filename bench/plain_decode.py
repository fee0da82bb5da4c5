"""The worker's two readers of a batch side by side: the models and the plain records (not a test).

``store.apply`` reads a text of plain ``record`` events with ``json.loads`` and the rules of
:mod:`sessions.rules` (:func:`sessions.decoding.read_batch`, :mod:`sessions.wire_records`)
and any other batch with the models (``decode_batch``: pydantic-core validates the whole text
in one call). This bench measures both on one batch of the tracker's own text, in one process,
the forms alternated round by round: CPU per event of reading, of the digest (``v3``, of either
reading; and ``v2``, pydantic-core's JSON of the models, the digest before the plain reader,
kept here as it was) and of grouping into the apply's deltas. Memory two ways: the peak of
traced Python memory for one batch (``tracemalloc``, which does not see pydantic-core's own
allocations), and what a forked child (as a pool process is) keeps privately after 20 batches
(its USS, from ``/proc/self/smaps_rollup``), with the objects alive before the fork frozen as a
worker freezes them::

    python -m bench.plain_decode                      # 5000 events over 1000 sessions, 15 rounds
    python -m bench.plain_decode --events 2000 --no-save
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic_core import to_json

from bench.ingest import RESULTS
from sessions import plain
from sessions.apply import Delta
from sessions.batch_digest import content_digest
from sessions.decoding import DecodedBatch, build_models, decode_batch, read_batch
from sessions.wire_records import WireRecord


def digest_v2(decoded: DecodedBatch) -> str:
    """The digest before the plain reader (``v2``), for records only: pydantic-core's JSON
    of the models (batches with metadata sorted it first; these have none)."""
    refused = [None for _ in decoded.rejected]
    return "v2:" + hashlib.sha256(to_json([list(decoded.events), refused])).hexdigest()


def group(events: Iterable[Any]) -> dict[str, Delta]:
    """The apply's grouping into deltas (``apply_events``' loop)."""
    deltas: dict[str, Delta] = {}
    for event in events:
        delta = deltas.get(event.session_id)
        if delta is None:
            delta = deltas[event.session_id] = Delta()
        delta.add(event)
    return deltas


def tracker_batch(events: int, sessions: int) -> str:
    """One batch as a tracker writes it: ``events`` plain records over ``sessions``, 10% errors."""
    rng = random.Random(15)
    items = [
        plain.plain_record(
            f"session-{rng.randrange(sessions)}",
            rng.random() * 0.2,
            rng.random() < 0.1,
            f"user-{rng.randrange(100)}",
            True,
            0,
            0,
            0.0,
        )
        for _ in range(events)
    ]
    assert all(item is not None for item in items)
    return plain.batch_json(uuid.uuid4(), items)  # type: ignore[arg-type]


def cpu_us_per_event(action: Callable[[], object], events: int) -> float:
    started = time.process_time()
    action()
    return (time.process_time() - started) / events * 1e6


def traced_peak_mib(action: Callable[[], object]) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _private_mib() -> float:
    """This process's USS: the pages only it maps (``Private_Clean`` + ``Private_Dirty``)."""
    private = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Private_Clean", "Private_Dirty"):
            private += int(rest.split()[0])
    return private / 1024


def child_growth_mib(action: Callable[[], object], batches: int) -> float:
    """What a child forked now keeps privately after running ``action`` ``batches`` times."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running the parent's cleanup
        os.close(reader)
        before = _private_mib()
        for _ in range(batches):
            action()
        os.write(writer, f"{_private_mib() - before}".encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        grown = float(pipe.read())
    os.waitpid(pid, 0)
    return grown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-save", action="store_true")
    arguments = parser.parse_args(argv)
    n, limit = arguments.events, 10 * arguments.events
    build_models()
    text = tracker_batch(n, arguments.sessions)
    models = decode_batch(text, limit)
    records = read_batch(text, limit)
    assert len(records.events) == len(models.events) == n and not models.rejected
    assert all(isinstance(event, WireRecord) for event in records.events)
    for record, event in zip(records.events, models.events, strict=True):
        assert tuple(record) == tuple(getattr(event, name) for name in WireRecord._fields)
    assert content_digest(records) == content_digest(models)

    def models_path() -> object:
        decoded = decode_batch(text, limit)
        return content_digest(decoded), group(decoded.events)

    def before_path() -> object:
        decoded = decode_batch(text, limit)
        return digest_v2(decoded), group(decoded.events)

    def plain_path() -> object:
        decoded = read_batch(text, limit)
        return content_digest(decoded), group(decoded.events)

    gc.collect()
    gc.freeze()  # as a worker does before its pool forks (sessions/worker/sharing.py)
    forms: dict[str, Callable[[], object]] = {
        "models: read (decode_batch)": lambda: decode_batch(text, limit),
        "plain: read (read_batch)": lambda: read_batch(text, limit),
        "plain: json.loads alone": lambda: json.loads(text),
        "models: digest v2 (before)": lambda: digest_v2(models),
        "models: digest v3": lambda: content_digest(models),
        "plain: digest v3": lambda: content_digest(records),
        "models: grouping into deltas": lambda: group(models.events),
        "plain: grouping into deltas": lambda: group(records.events),
        "before: models, digest v2, group": before_path,
        "models: read, digest v3, group": models_path,
        "plain: read, digest v3, group": plain_path,
    }
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for round_ in range(arguments.rounds):
        order = list(forms.items())
        if round_ % 2:
            order.reverse()
        for name, action in order:
            samples[name].append(cpu_us_per_event(action, n))
    memory = {
        "models": {
            "traced_peak_mib": traced_peak_mib(models_path),
            "child_keeps_mib": child_growth_mib(models_path, 20),
        },
        "plain": {
            "traced_peak_mib": traced_peak_mib(plain_path),
            "child_keeps_mib": child_growth_mib(plain_path, 20),
        },
    }
    figures = {
        name: {"min": min(values), "median": statistics.median(values)}
        for name, values in samples.items()
    }
    print(f"{n} events over {arguments.sessions} sessions, {arguments.rounds} rounds alternated")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| form | CPU us per event, median (min) |")
    print("|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value['median']:.2f} ({value['min']:.2f}) |")
    print(
        "\n| reader | peak traced Python memory for one batch, MiB "
        "| a forked child keeps after 20 batches, MiB |"
    )
    print("|---|---:|---:|")
    for name, figure in memory.items():
        print(f"| {name} | {figure['traced_peak_mib']:.1f} | {figure['child_keeps_mib']:.1f} |")
    if not arguments.no_save:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / f"plain-decode-{stamp}.json"
        command = " ".join(["python", "-m", "bench.plain_decode", *(argv or sys.argv[1:])])
        path.write_text(
            json.dumps(
                {
                    "command": command,
                    "load_average": os.getloadavg(),
                    "events": n,
                    "sessions": arguments.sessions,
                    "rounds": arguments.rounds,
                    "cpu_us_per_event": figures,
                    "samples": samples,
                    "memory": memory,
                },
                indent=1,
            )
        )
        print(f"\nsaved {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
