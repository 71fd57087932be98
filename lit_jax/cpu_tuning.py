"""Tuning for XLA:CPU's host memory, in one opt-in place; it does nothing on other backends.

Two things help a CPU run, both about glibc malloc:

- Huge pages for each step's buffers (`reexec_with_hugepages`, `env_with_hugepages`).
  XLA:CPU allocates an execution's temporaries with malloc (a SmolLM2 train step: a few
  hundred MB, e.g. the stacked activations the backward pass reads). glibc serves
  allocations that large with a fresh mmap and unmaps them on free, so every step touches
  new pages: one page fault and one kernel page clear per 4 KiB. With
  `glibc.malloc.hugetlb=1` (glibc >= 2.35) glibc marks those mappings for transparent huge
  pages (madvise): 2 MiB per fault. The measured gain is in README (benchmarks/train_step.py).
  glibc reads tunables only when a process starts, so the command line re-executes itself
  once with the tunable set; the benchmarks start their child processes with
  `env_with_hugepages`. Opt out with LIT_JAX_HUGEPAGES=0. A process that imports lit_jax
  as a library keeps its own environment: start it with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the same effect.
- Compiling before the first run and returning the compiler's freed memory
  (`CompiledPerShape`, `release_host_memory`). XLA's compiler allocates a few hundred MB
  on the host and frees it, but glibc keeps the freed pages in its arenas; the first step
  of a new shape then runs on top of them, which sets the process's peak RSS. Compiling
  explicitly (`lower(...).compile()`) and calling `malloc_trim(0)` before the first
  execution gives those pages back.

The re-exec has to happen before JAX starts, so it cannot ask JAX for its backend; it
skips itself when JAX_PLATFORMS names another platform first or an accelerator plugin is
installed (`runs_on_cpu`). `CompiledPerShape` asks `jax.default_backend()` at its first call.
This module imports JAX only there, so an entry point can call `reexec_with_hugepages`
cheaply first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import Any, Callable, Mapping

_KEY = "glibc.malloc.hugetlb="
TUNABLE = _KEY + "1"
OPT_OUT = "LIT_JAX_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Top-level modules that give JAX a non-CPU backend. PJRT plugins (CUDA: xla_cuda12 /
# xla_cuda13, ROCm, ...) live in the `jax_plugins` namespace, which `accelerator_plugin`
# lists as a whole; TPU comes from libtpu.
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


# ----------------------------------------------------------------------------- which backend


def accelerator_plugin() -> str | None:
    """The name of an installed JAX accelerator plugin (found, never imported), or None."""
    for name in ACCELERATOR_MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        for module in pkgutil.iter_modules(list(namespace.submodule_search_locations)):
            return "jax_plugins." + module.name
    return None


def runs_on_cpu(env: Mapping[str, str] | None = None) -> bool:
    """Whether a JAX process started with `env` (default os.environ) will run on XLA:CPU.

    JAX_PLATFORMS decides when set ("cpu" or "cpu,..." -> True, "cuda", "tpu", ... ->
    False); otherwise JAX takes an accelerator whenever a plugin for one is installed.
    """
    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return accelerator_plugin() is None


# ----------------------------------------------------------------------------- huge pages


def _glibc_version() -> tuple[int, ...] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def supported() -> bool:
    """Linux with glibc >= 2.35 and transparent huge pages not switched off."""
    version = _glibc_version()
    return sys.platform.startswith("linux") and version is not None and version >= (2, 35) \
        and _thp_mode() in ("always", "madvise")


def has_tunable(env: Mapping[str, str]) -> bool:
    return any(t.startswith(_KEY) for t in env.get("GLIBC_TUNABLES", "").split(":"))


def env_without_hugepages(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of env with any `glibc.malloc.hugetlb=` tunable removed (for comparisons)."""
    env = dict(env)
    if "GLIBC_TUNABLES" in env:
        env["GLIBC_TUNABLES"] = ":".join(t for t in env["GLIBC_TUNABLES"].split(":") if not t.startswith(_KEY))
    return env


def env_with_hugepages(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of env (default os.environ) whose GLIBC_TUNABLES asks for huge pages.

    Other tunables are kept. The copy is returned unchanged when env has an explicit
    `glibc.malloc.hugetlb=` setting, opts out (LIT_JAX_HUGEPAGES=0), the platform cannot
    use huge pages (`supported`), or the process will not run on CPU (`runs_on_cpu`).
    """
    env = dict(os.environ if env is None else env)
    if env.get(OPT_OUT, "1") == "0" or has_tunable(env) or not supported() or not runs_on_cpu(env):
        return env
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def reexec_with_hugepages() -> None:
    """Re-executes this Python process (same PID, same command line) with the tunable set.

    Call it first thing in an entry point, before JAX starts. It returns without doing
    anything when `env_with_hugepages` leaves the environment as it is (the tunable is
    already in effect, opted out, unsupported platform, not a CPU run), so it runs at
    most once.
    """
    env = env_with_hugepages()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


# ----------------------------------------------------------------------------- compile, then trim


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_trim = _malloc_trim()


def release_host_memory() -> None:
    """Returns glibc's free heap pages to the OS (malloc_trim(0)); a no-op without glibc."""
    _trim()


def _signature(args: tuple) -> Any:
    import jax

    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


class CompiledPerShape:
    """Calls `jitted(*args)`; on the CPU backend through one AOT-compiled executable per argument signature.

    On CPU each new signature (tree structure, shapes, dtypes, shardings) is compiled with
    `jitted.lower(*args).compile()` and `release_host_memory()` runs before its first
    execution. On any other backend it is `jitted(*args)` (JAX's own cache). The backend
    is `jax.default_backend()` at the first call.
    """

    def __init__(self, jitted):
        self.jitted = jitted
        self._compiled: dict[Any, Any] = {}
        self._on_cpu: bool | None = None

    def __call__(self, *args):
        if self._on_cpu is None:
            import jax

            self._on_cpu = jax.default_backend() == "cpu"
        if not self._on_cpu:
            return self.jitted(*args)
        key = _signature(args)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self.jitted.lower(*args).compile()
            release_host_memory()
        return compiled(*args)
