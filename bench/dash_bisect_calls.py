"""The overview's store calls timed with whichever ``sessions`` is importable (this tree, or an
older one put first on ``PYTHONPATH``), on a store seeded before; the dash-bisect runs (not a
test)::

    python -m bench.dash_bisect_calls --url postgresql+psycopg://... --label head --repeat 5
    PYTHONPATH=/tmp/old-tree python /work/wt/dash-bisect/bench/dash_bisect_calls.py --url ...

Prints one JSON line: the median (and every) ms per call after one warm-up call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import sessions
from sessions.settings import Settings
from sessions.store import SessionStore


def _load_overview_calls() -> ModuleType:
    # From its file, not as ``bench.overview_calls``: with an older tree first on PYTHONPATH,
    # ``bench`` would be that tree's package, which may not have the module.
    spec = importlib.util.spec_from_file_location(
        "overview_calls", Path(__file__).with_name("overview_calls.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_overview = _load_overview_calls()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--label", default="")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", nargs="+")
    arguments = parser.parse_args()
    store = SessionStore(arguments.url, settings=Settings(database_url=arguments.url))

    calls = _overview.overview_calls(store)
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
        seconds = _overview.call_seconds(call, arguments.repeat)
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
