"""Huge pages for XLA's buffers: the environment is composed right, the re-exec happens once
in the same process, and glibc then really serves large allocations with fewer page faults."""

import os
import subprocess
import sys

import pytest

from lit_jax.utils import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="needs Linux, glibc >= 2.35 and THP not 'never'")


def test_thp_mode_is_read_from_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages._thp_mode(str(f)) == "madvise"
    f.write_text("always madvise [never]\n")
    assert hugepages._thp_mode(str(f)) == "never"
    assert hugepages._thp_mode(str(tmp_path / "missing")) is None


def test_env_keeps_other_tunables_and_explicit_settings(monkeypatch):
    monkeypatch.setattr(hugepages, "supported", lambda: True)
    assert hugepages.env_with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = hugepages.env_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert hugepages.env_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == \
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert hugepages.env_with_hugepages({"LIT_JAX_HUGEPAGES": "0"}) == {"LIT_JAX_HUGEPAGES": "0"}
    assert hugepages.env_without_hugepages(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"}
    monkeypatch.setattr(hugepages, "supported", lambda: False)
    assert hugepages.env_with_hugepages({"A": "b"}) == {"A": "b"}


_CHILD = """
import os, sys
from lit_jax.utils.hugepages import reexec_with_hugepages
print("start", os.getpid(), flush=True)
reexec_with_hugepages()
print("tunables", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def _child(*args, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LIT_JAX_HUGEPAGES")}
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env={**clean, **env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return p.pid, out.splitlines()


@needs_thp
def test_reexec_runs_the_same_command_once_in_the_same_process():
    pid, lines = _child("x", "--flag=1")
    # the program started twice (before and after exec), in one process, and ran on once
    assert lines == [f"start {pid}", f"start {pid}", "tunables glibc.malloc.hugetlb=1 ['x', '--flag=1']"]


def test_reexec_does_nothing_when_opted_out():
    pid, lines = _child(LIT_JAX_HUGEPAGES="0")
    assert lines == [f"start {pid}", "tunables None []"]


_FAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20  # large enough that glibc serves it with its own mmap (numpy would madvise by itself)
p = libc.malloc(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@needs_thp
def test_the_tunable_cuts_page_faults_of_a_large_allocation():
    """What the CLI gains: touching 64 MiB takes 16384 faults of 4 KiB pages; with the tunable
    a few hundred (543 on the development machine; 32 if every 2 MiB page were huge)."""
    def faults(env):
        clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        r = subprocess.run([sys.executable, "-c", _FAULTS], env={**clean, **env}, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    plain = faults({})
    huge = faults(hugepages.env_with_hugepages({}))
    assert plain > 8000, plain
    assert huge < plain / 4, (huge, plain)
