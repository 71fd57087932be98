"""Counts how often jitted entry points are traced, so tests (and logs) can show no recompiles.

Call `count_trace("name")` at the top of a function that is jitted: the Python body only
runs when JAX traces it, so the counter counts compilations, not calls.
"""

from __future__ import annotations

import collections

TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def count_trace(name: str) -> None:
    TRACE_COUNTS[name] += 1
