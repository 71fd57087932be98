"""Counting how often JAX traces a function, test-locally (no counter in production code).

JAX reports each trace of a jitted function as a '/jax/core/compile/jaxpr_trace_duration'
event carrying the function's name; a trace happens exactly when a call must compile.
"""

from __future__ import annotations

import contextlib
import collections

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def count_traces():
    """Yields a Counter {function name: traces while the context is open}."""
    counts: collections.Counter[str] = collections.Counter()

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == TRACE_EVENT:
            counts[kwargs.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
