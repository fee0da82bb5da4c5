"""The store's apply semantics in plain Python, for property tests.

The model is :class:`sessions.testing.InMemoryStore` (shipped, so that users can test their own
agents against it): it implements the rules of issue 3 and of the ``sessions/apply.py``
docstring directly and eagerly (every event changes the state at once; nothing is coalesced),
so any difference from the store is either a bug in the store's batching, its fast/slow paths,
its SQL, or in the model. The hypothesis properties of ``tests/integration/test_properties.py``
hold ``SessionStore.apply`` to it, batch for batch, which is what makes the in-memory store's
semantics the store's.
"""

from __future__ import annotations

import math

from sessions.records import COUNTERS
from sessions.testing import InMemoryStore, session_totals

#: The specification the properties hold the store to.
ReferenceStore = InMemoryStore

__all__ = ["COUNTERS", "ReferenceStore", "exact_percentile", "session_totals"]


def exact_percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of raw samples: what ``histogram.percentile`` estimates."""
    ordered = sorted(samples)
    return ordered[math.ceil(fraction * len(ordered)) - 1]
