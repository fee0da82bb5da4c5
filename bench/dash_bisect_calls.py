"""The overview's store calls timed with whichever ``sessions`` is importable (this tree, or an
older one put first on ``PYTHONPATH``), on a store seeded before; the dash-bisect runs (not a
test)::

    python -m bench.dash_bisect_calls --url postgresql+psycopg://... --label head --repeat 5
    PYTHONPATH=/tmp/old-tree python /work/wt/dash-bisect/bench/dash_bisect_calls.py --url ...

Prints one JSON line: the median (and every) ms per call after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime, timedelta

import sessions
from sessions.dashboard.reads import by_status, health_counts
from sessions.settings import Settings
from sessions.store import SessionStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--label", default="")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", nargs="+")
    arguments = parser.parse_args()
    store = SessionStore(arguments.url, settings=Settings(database_url=arguments.url))

    def activity() -> object:
        now = datetime.now(UTC)
        return store.activity(now - timedelta(minutes=59), now)

    calls = {
        "activity": activity,
        "unhealthy": lambda: store.unhealthy(limit=50),
        "by_status": lambda: by_status(store),
        "top_users(requests)": lambda: store.top_users(by="requests", limit=10),
        "top_users(p95)": lambda: store.top_users(by="p95", limit=10),
        "health_counts": lambda: health_counts(store),
    }
    result: dict[str, object] = {
        "label": arguments.label,
        "sessions_from": sessions.__file__,
        "url": arguments.url,
        "at": datetime.now(UTC).isoformat(),
    }
    answers: dict[str, str] = {}
    for name, call in calls.items():
        if arguments.calls and name not in arguments.calls:
            continue
        answer = call()
        answers[name] = repr(answer)[:20000]
        seconds = []
        for _ in range(arguments.repeat):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        result[name] = {
            "median_ms": round(statistics.median(seconds) * 1000, 1),
            "all_ms": [round(s * 1000, 1) for s in seconds],
        }
    if "top_users(p95)" in answers:
        result["top_users(p95)_answer"] = answers["top_users(p95)"][:3000]
    store.dispose()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
