"""Worker CPU per event of ``store.apply()``, the forms before issue 15's worker-CPU change
against today's, batch by batch in one process (not a test).

On a machine shared with other work the CPU time of a whole run moves by 20-40% between
identical runs (bench/apply_alone.py alternated three times could not separate a 10%
change), so this bench applies one stream of wire-form batches to one PostgreSQL database
and switches the implementation before every batch: odd batches run the forms before the
change (kept below, as they were), even ones today's, the order swapped in each pair. Both
write the same rows (the forms are equal by tests/unit/test_apply_delta.py), so the
database and the load are the same for both sides; their CPU per event is summed per side.
With ``--phases`` each side's CPU is also split by phase (per-batch timers around
the store's reader, ``content_digest``, the apply's Python and the statements' execution)::

    python -m bench.worker_cpu_ab                       # 200,000 events, batches of 2000
    python -m bench.worker_cpu_ab --phases --no-save
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

import sessions.apply as apply_module
import sessions.decoding as decoding
import sessions.store as store_module
from bench.ingest import RESULTS, TRUNCATE_OURS, _cpu_seconds, wire_batches
from sessions.apply import Delta
from sessions.decoding import DecodedBatch, WireBatch
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tables import latency_pairs
from tests.support.services import temporary_postgres_database
from tests.unit.test_apply_delta import plain_add  # Delta.add before the change, kept there

# -- the forms before the change (d091de3), verbatim but for their names (Delta.add: the test's)


def _latency_literal_before(latency: dict[int, int]) -> str | None:
    if not latency:
        return None
    return "{" + ",".join(map(str, latency_pairs(latency))) + "}"


def _decode_text_before(payload: str | bytes, max_events: int) -> DecodedBatch:
    try:
        batch = WireBatch.model_validate_json(payload)
    except Exception:
        pass
    else:
        if len(batch.events) <= max_events:
            return DecodedBatch(batch_id=batch.batch_id, events=batch.events)
    return _decode_text_now(payload, max_events)  # a refused batch: the same either way


_add_now = Delta.add
_latency_literal_now = apply_module._latency_literal
_decode_text_now = decoding._decode_text
#: Each side's forms, and the reader ``store.apply`` uses: since 2026-12-07 (README item 10)
#: the store reads a batch of plain records without models (``read_batch``), so the side
#: before reads with the models (``decode_batch``), as every batch was read at d091de3. The
#: digest is today's on both sides.
SIDES: dict[str, tuple[Callable[..., Any], ...]] = {
    "before": (plain_add, _latency_literal_before, _decode_text_before, decoding.decode_batch),
    "now": (_add_now, _latency_literal_now, _decode_text_now, decoding.read_batch),
}
#: The reader the side in use has; ``store.apply`` calls it through :func:`_read`.
_reader: list[Callable[..., Any]] = [decoding.read_batch]


def _read(payload: Any, max_events: int) -> Any:
    return _reader[0](payload, max_events)


store_module.read_batch = _read


def use(side: str) -> None:
    """Switch the forms and the reader to ``side``'s."""
    add, literal, decode_text, reader = SIDES[side]
    Delta.add = add  # type: ignore[method-assign]
    apply_module._latency_literal = literal
    decoding._decode_text = decode_text
    _reader[0] = reader


# -- phases ---------------------------------------------------------------------------------

#: CPU seconds by phase of the side being measured (exclusive of the phases nested in it).
phase_seconds: collections.Counter[str] = collections.Counter()
_open: list[float] = []


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, its exclusive CPU time added to ``phase_seconds[name]`` at each call."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        _open.append(0.0)
        try:
            return function(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            phase_seconds[name] += spent - _open.pop()
            if _open:
                _open[-1] += spent

    return wrapper


def time_phases() -> None:
    """Wrap the per-batch calls of ``store.apply`` in timers (a few calls per batch)."""
    import sqlalchemy.engine.base as engine_base
    import sqlalchemy.engine.default as engine_default

    store_module.read_batch = timed("decode", store_module.read_batch)
    store_module.content_digest = timed("ledger digest", store_module.content_digest)
    store_module.apply_events = timed("apply.py grouping", store_module.apply_events)
    apply_module.upsert_records = timed(
        "apply.py statement parameters", apply_module.upsert_records
    )
    store_module.add_activity = timed("apply.py per-minute activity", store_module.add_activity)
    engine_base.Connection.execute = timed(  # type: ignore[method-assign]
        "SQLAlchemy (statement, cache, results)", engine_base.Connection.execute
    )
    for name in ("do_execute", "do_executemany"):
        method = getattr(engine_default.DefaultDialect, name)
        setattr(engine_default.DefaultDialect, name, timed("psycopg execute", method))
    SessionStore._transaction = timed(  # type: ignore[method-assign]
        "transaction (connect, begin, commit)", SessionStore._transaction
    )
    SessionStore.apply = timed("store.apply: the rest", SessionStore.apply)  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-events", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--phases", action="store_true", help="split each side's CPU by phase")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    arguments = parser.parse_args()
    decoding.build_models()
    batches = max(20, arguments.events // arguments.batch_events)
    texts = wire_batches(arguments.sessions, batches + 1, arguments.batch_events)
    if arguments.phases:
        time_phases()
    client: dict[str, float] = dict.fromkeys(SIDES, 0.0)
    server: dict[str, float] = dict.fromkeys(SIDES, 0.0)
    phases: dict[str, collections.Counter[str]] = {side: collections.Counter() for side in SIDES}
    events: collections.Counter[str] = collections.Counter()
    per_batch: dict[str, list[float]] = {side: [] for side in SIDES}
    with temporary_postgres_database("sessions_bench_worker_cpu") as url:
        store = SessionStore(url, settings=Settings())
        store.upgrade()
        with store.engine.begin() as connection:
            connection.execute(text(TRUNCATE_OURS))
        store.apply(texts[0])  # connect, prepare
        with store.engine.connect() as connection:
            backend = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
        # As a worker's pool process runs: everything made while setting up frozen out of the
        # collector's scans (sessions/worker/sharing.py), so that a full collection costs what
        # it costs there, not a scan of the bench's own set-up.
        gc.collect()
        gc.freeze()
        for index, message in enumerate(texts[1:]):
            pair, second = divmod(index, 2)
            side = ("before", "now")[(pair + second) % 2]  # before-now, now-before, ...
            use(side)
            phase_seconds.clear()
            backend_before, started = _cpu_seconds(backend), time.thread_time()
            store.apply(message)
            spent = time.thread_time() - started
            client[side] += spent
            per_batch[side].append(spent / arguments.batch_events * 1e6)
            server[side] += _cpu_seconds(backend) - backend_before
            phases[side].update(phase_seconds)
            events[side] += arguments.batch_events
        use("now")
        store.dispose()

    def per_event(seconds: float, side: str) -> float:
        return seconds / events[side] * 1e6

    result: dict[str, Any] = {
        "command": "python -m bench.worker_cpu_ab " + " ".join(sys.argv[1:]),
        "at": datetime.now(UTC).isoformat(),
        "batch_events": arguments.batch_events,
        "sessions": arguments.sessions,
        "events_per_side": events["now"],
        "worker_us_per_event": {side: per_event(client[side], side) for side in SIDES},
        # A batch the machine's other work slowed weighs less in the median than in the sum.
        "worker_us_per_event_median_batch": {
            side: statistics.median(per_batch[side]) for side in SIDES
        },
        "postgresql_us_per_event": {side: per_event(server[side], side) for side in SIDES},
    }
    result["worker_now_vs_before"] = (
        result["worker_us_per_event"]["now"] / result["worker_us_per_event"]["before"]
    )
    result["worker_median_now_vs_before"] = (
        result["worker_us_per_event_median_batch"]["now"]
        / result["worker_us_per_event_median_batch"]["before"]
    )
    result["postgresql_now_vs_before"] = (
        result["postgresql_us_per_event"]["now"] / result["postgresql_us_per_event"]["before"]
    )
    if arguments.phases:
        result["phases_us_per_event"] = {
            side: {name: per_event(seconds, side) for name, seconds in counts.most_common()}
            for side, counts in phases.items()
        }
    print(json.dumps(result, indent=2))
    if not arguments.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (RESULTS / f"worker-cpu-ab-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
