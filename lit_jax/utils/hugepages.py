"""Transparent huge pages for XLA:CPU's per-step buffers, through glibc's malloc tunable.

Why: XLA:CPU allocates each execution's temporaries with malloc (a SmolLM2 train step: a
few hundred MB, e.g. the stacked activations the backward pass reads). glibc serves
allocations that large with a fresh mmap and unmaps them on free, so every step touches
new pages: one page fault and one kernel page clear per 4 KiB, ~74k faults and ~0.1 s of
a 1.4 s step on a 2-core CPU. With `glibc.malloc.hugetlb=1` (glibc >= 2.35) glibc marks
those mappings for transparent huge pages (madvise), 2 MiB per fault; the step then took
about 1.28 s (benchmarks/train_step.py, README). Peak RSS did not grow.

glibc reads tunables only when a process starts, so the command line re-executes itself
once with the tunable set (`reexec_with_hugepages`); the benchmarks start their child
processes with `env_with_hugepages`. Opt out with LIT_JAX_HUGEPAGES=0. A process that
imports lit_jax as a library keeps its own environment: start it with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to get the same effect.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

_KEY = "glibc.malloc.hugetlb="
TUNABLE = _KEY + "1"
OPT_OUT = "LIT_JAX_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


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

    Other tunables are kept; an explicit `glibc.malloc.hugetlb=` setting is left as it
    is, and so is everything when the user opted out or the platform cannot use it.
    """
    env = dict(os.environ if env is None else env)
    if env.get(OPT_OUT, "1") == "0" or has_tunable(env) or not supported():
        return env
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def reexec_with_hugepages() -> None:
    """Re-executes this Python process (same PID, same command line) with the tunable set.

    Call it first thing in an entry point, before JAX starts. It returns without doing
    anything when the tunable is already in effect, the user opted out, or the platform
    cannot use it, so it runs at most once.
    """
    env = env_with_hugepages()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
