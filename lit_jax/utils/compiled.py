"""A jitted function compiled ahead of its first call per input shape, with the compiler's freed memory returned.

XLA's compiler allocates a few hundred MB on the host (SmolLM2's train step: ~0.3 GB) and
frees it, but glibc keeps the freed pages in its arenas; the first step of a new shape
then runs on top of them, which sets the process's peak RSS. Compiling explicitly
(`lower(...).compile()`) and calling `malloc_trim(0)` before the first execution gives
those pages back. Elsewhere (no glibc) it is a plain per-shape cache of compiled calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Callable

import jax


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


release_host_memory = _malloc_trim()


def _signature(args: tuple) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


class CompiledPerShape:
    """Calls `jitted(*args)` through one compiled executable per argument signature."""

    def __init__(self, jitted):
        self.jitted = jitted
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args):
        key = _signature(args)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self.jitted.lower(*args).compile()
            release_host_memory()
        return compiled(*args)
