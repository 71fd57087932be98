"""lit_jax.cpu_tuning: the huge-page environment is composed right and only for CPU runs, the
re-exec happens once in the same process, and CompiledPerShape compiles once per shape on CPU."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax import cpu_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_thp = pytest.mark.skipif(not cpu_tuning.supported() or cpu_tuning.accelerator_plugin() is not None,
                               reason="needs Linux, glibc >= 2.35, THP not 'never' and no accelerator plugin")


@pytest.fixture
def cpu_host(monkeypatch):
    """A platform that supports huge pages, with no accelerator plugin installed."""
    monkeypatch.setattr(cpu_tuning, "supported", lambda: True)
    monkeypatch.setattr(cpu_tuning, "accelerator_plugin", lambda: None)


def test_thp_mode_is_read_from_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert cpu_tuning._thp_mode(str(f)) == "madvise"
    f.write_text("always madvise [never]\n")
    assert cpu_tuning._thp_mode(str(f)) == "never"
    assert cpu_tuning._thp_mode(str(tmp_path / "missing")) is None


def test_env_keeps_other_tunables_and_explicit_settings(cpu_host, monkeypatch):
    assert cpu_tuning.env_with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = cpu_tuning.env_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert cpu_tuning.env_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == \
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert cpu_tuning.env_with_hugepages({"LIT_JAX_HUGEPAGES": "0"}) == {"LIT_JAX_HUGEPAGES": "0"}
    assert cpu_tuning.env_without_hugepages(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"}
    monkeypatch.setattr(cpu_tuning, "supported", lambda: False)
    assert cpu_tuning.env_with_hugepages({"A": "b"}) == {"A": "b"}


def test_jax_platforms_decides_the_backend(cpu_host):
    for platforms, cpu in (("cpu", True), ("cpu,cuda", True), ("gpu", False), ("cuda,cpu", False), ("tpu", False)):
        env = {"JAX_PLATFORMS": platforms}
        assert cpu_tuning.runs_on_cpu(env) is cpu, platforms
        assert cpu_tuning.has_tunable(cpu_tuning.env_with_hugepages(env)) is cpu, platforms
    assert cpu_tuning.runs_on_cpu({"JAX_PLATFORMS": ""})


@pytest.mark.parametrize("module", ["jax_plugins/xla_cuda12", "jax_plugins/xla_rocm7", "libtpu", "jax_cuda13_plugin"])
def test_an_installed_accelerator_plugin_skips_huge_pages(tmp_path, monkeypatch, module):
    # Only tmp_path is searched, so a plugin installed on this machine cannot decide the result.
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    for name in (*cpu_tuning.ACCELERATOR_MODULES, "jax_plugins"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(cpu_tuning, "supported", lambda: True)
    assert cpu_tuning.accelerator_plugin() is None
    assert cpu_tuning.has_tunable(cpu_tuning.env_with_hugepages({}))
    (tmp_path / module).mkdir(parents=True)
    (tmp_path / module / "__init__.py").write_text("raise RuntimeError('a plugin must not be imported')\n")
    importlib.invalidate_caches()
    assert cpu_tuning.accelerator_plugin() == module.replace("/", ".")
    assert not cpu_tuning.runs_on_cpu({})
    assert cpu_tuning.env_with_hugepages({}) == {}
    assert cpu_tuning.runs_on_cpu({"JAX_PLATFORMS": "cpu"})  # asked for CPU explicitly: it runs there
    assert cpu_tuning.has_tunable(cpu_tuning.env_with_hugepages({"JAX_PLATFORMS": "cpu"}))
    assert module.split("/")[0] not in sys.modules


class _Exec(Exception):
    pass


def _reexec(monkeypatch, env):
    """Calls reexec_with_hugepages with os.environ = env; (path, argv, env) it would exec, or None."""
    monkeypatch.setattr(os, "environ", dict(env))

    def execve(path, argv, new_env):
        raise _Exec(path, argv, new_env)

    monkeypatch.setattr(os, "execve", execve)
    try:
        cpu_tuning.reexec_with_hugepages()
    except _Exec as e:
        return e.args
    return None


def test_reexec_sets_the_tunable_for_the_same_command(cpu_host, monkeypatch):
    path, argv, env = _reexec(monkeypatch, {"A": "b"})
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env == {"A": "b", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    for skip in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {"LIT_JAX_HUGEPAGES": "0"},
                 {"JAX_PLATFORMS": "gpu"}):
        assert _reexec(monkeypatch, skip) is None, skip
    monkeypatch.setattr(cpu_tuning, "supported", lambda: False)
    assert _reexec(monkeypatch, {"A": "b"}) is None
    monkeypatch.setattr(cpu_tuning, "supported", lambda: True)
    monkeypatch.setattr(cpu_tuning, "accelerator_plugin", lambda: "jax_plugins.xla_cuda12")
    assert _reexec(monkeypatch, {"A": "b"}) is None


_CHILD = """
import os, sys
from lit_jax.cpu_tuning import reexec_with_hugepages
print("start", os.getpid(), flush=True)
reexec_with_hugepages()
print("tunables", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def _child(*args, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LIT_JAX_HUGEPAGES", "JAX_PLATFORMS")}
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


@needs_thp  # elsewhere nothing would re-exec anyway
@pytest.mark.parametrize("env", [{"LIT_JAX_HUGEPAGES": "0"}, {"JAX_PLATFORMS": "tpu"}, "plugin"])
def test_reexec_does_nothing_when_opted_out_or_not_on_cpu(env, tmp_path):
    if env == "plugin":  # a GPU host: the CUDA PJRT plugin is installed
        (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
        (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    pid, lines = _child(**env)
    assert lines == [f"start {pid}", "tunables None []"]


class _CountingJit:
    """A jitted function that counts its compilations and direct calls."""

    def __init__(self, fn):
        self.jitted, self.lowered, self.called = jax.jit(fn), 0, 0

    def lower(self, *args):
        self.lowered += 1
        return self.jitted.lower(*args)

    def __call__(self, *args):
        self.called += 1
        return self.jitted(*args)


def test_compiled_per_shape_compiles_once_per_signature_on_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    trims = []
    monkeypatch.setattr(cpu_tuning, "_trim", lambda: trims.append(1))
    jitted = _CountingJit(lambda x, y: x * 2 + y)
    fn = cpu_tuning.CompiledPerShape(jitted)
    for n in (3, 3, 4, 3, 4):
        np.testing.assert_array_equal(fn(jnp.arange(n), jnp.ones(n, jnp.int32)), np.arange(n) * 2 + 1)
    fn(jnp.arange(3.0), jnp.ones(3))  # another dtype: another executable
    assert (jitted.lowered, jitted.called, len(trims)) == (3, 0, 3)


def test_compiled_per_shape_leaves_other_backends_to_jax(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cpu_tuning, "_trim", lambda: pytest.fail("malloc_trim off CPU"))
    jitted = _CountingJit(lambda x: x + 1)
    fn = cpu_tuning.CompiledPerShape(jitted)
    for n in (3, 3, 4):
        np.testing.assert_array_equal(fn(jnp.arange(n)), np.arange(n) + 1)
    assert (jitted.lowered, jitted.called) == (0, 3)
