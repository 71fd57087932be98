"""What the three launchers share: the lit_jax command line, override checks, printing and running plans.

A launcher turns its arguments into a `Plan` (lists of argv lists) with pure functions; `--dry-run`
prints each command with `shlex.join`, one per line, so a printed line pasted into a shell (or
`shlex.split`) gives back exactly the argv the launcher would have run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from typing import Sequence, TextIO

Argv = list[str]

# The GPU flags of JAX's "GPU performance tips" (docs/gpu_performance_tips.md) that are neither
# workload-specific nor experimental: the latency-hiding scheduler overlaps collectives (the fsdp
# all-gathers and reduce-scatters) with compute; its default is false. More with --xla-flag.
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
# JAX preallocates 75% of GPU memory by default; NVIDIA's JAX-Toolbox guide typically sets 0.9 or
# 0.8, leaving the rest to NCCL and cuDNN workspaces.
GPU_MEM_FRACTION = 0.9
# The same JAX page: "may be useful for single-host multi-device computations ... don't seem useful
# for multi-host communication yet", so only runs on one host get them.
SINGLE_HOST_NCCL_ENV = (("NCCL_LL128_BUFFSIZE", "-2"), ("NCCL_LL_BUFFSIZE", "-2"), ("NCCL_PROTO", "SIMPLE,LL,LL128"))
# Paths that are per machine on every cluster: a multi-host run's checkpoints cannot live there.
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm")
DISTRIBUTED_FLAG = "--config.mesh.distributed=True"


class LaunchError(ValueError):
    """A bad launcher argument; the message starts with the flag it is about."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Commands in three phases. setup: in order, stopping at the first failure. run: the job itself,
    one command or several started at once (parallel=True; run_logs[i], if given, receives command
    i's output). collect: in order after the run, also when it failed (its logs matter most then)."""

    setup: tuple[Argv, ...] = ()
    run: tuple[Argv, ...] = ()
    collect: tuple[Argv, ...] = ()
    parallel: bool = False
    run_logs: tuple[str, ...] = ()

    def commands(self) -> list[Argv]:
        return [*self.setup, *self.run, *self.collect]


def add_job_args(parser: argparse.ArgumentParser, *, workdir_required: bool) -> None:
    """--config, --workdir and --dry-run, the same on every launcher."""
    parser.add_argument("--config", required=True, help="config file, e.g. configs/llama3_8b.py (optionally :arg)")
    parser.add_argument("--workdir", required=workdir_required, default=None,
                        help="checkpoints, metrics, summary (lit_jax.main --workdir); shared storage on several hosts")
    parser.add_argument("--dry-run", action="store_true", help="print every command, one per line, and run nothing")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, Argv]:
    """The launcher's own arguments and the `--config.KEY=VALUE` overrides passed on to lit_jax.main.

    Overrides may stand among the launcher's arguments or after `--`; their order is kept (a later
    override of the same key wins in lit_jax.main, as typed)."""
    argv = list(argv)
    tail: Argv = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    ns, unknown = parser.parse_known_args(argv)
    try:
        overrides = check_overrides([*unknown, *tail])
    except LaunchError as e:
        parser.error(str(e))
    return ns, overrides


def check_overrides(overrides: Sequence[str]) -> Argv:
    """Each token a `--config.KEY[=VALUE]` flag; the launcher owns --config=, --workdir and mesh.distributed."""
    for token in overrides:
        if token.startswith(("--config=", "--workdir")):
            raise LaunchError(f"{token}: give the config and work dir with the launcher's own --config and --workdir")
        if token.startswith("--config.mesh.distributed"):
            raise LaunchError(f"{token}: the launcher sets --config.mesh.distributed itself "
                              "(True for several processes, the config's value for one)")
        if not token.startswith("--config."):
            raise LaunchError(f"{token!r}: not an option of this launcher nor a config override; overrides are "
                              "--config.KEY=VALUE in one argument (quote values with spaces)")
    return list(overrides)


def main_argv(config: str, workdir: str | None, overrides: Sequence[str], *, distributed: bool,
              python: str = "python") -> Argv:
    """`python -m lit_jax.main --config=... [--workdir=...] [overrides] [--config.mesh.distributed=True]`.

    Overrides follow --config (ml_collections applies them to the loaded config); the distributed
    flag comes last, so nothing can switch it off."""
    argv = [python, "-m", "lit_jax.main", f"--config={config}"]
    if workdir:
        argv.append(f"--workdir={workdir}")
    argv += overrides
    if distributed:
        argv.append(DISTRIBUTED_FLAG)
    return argv


def env_prefix(env: Sequence[tuple[str, str]]) -> Argv:
    """`env K=V ...`: environment variables as part of an argv, so the printed command stays one line."""
    return ["env", *(f"{k}={v}" for k, v in env)] if env else []


def gpu_env(mem_fraction: float, extra_xla_flags: Sequence[str], *, single_host: bool) -> list[tuple[str, str]]:
    """XLA_FLAGS, XLA_PYTHON_CLIENT_MEM_FRACTION and, on one host, the NCCL settings (see the constants)."""
    if not 0.0 < mem_fraction <= 1.0:
        raise LaunchError(f"--mem-fraction={mem_fraction}: must be in (0, 1]")
    for f in extra_xla_flags:
        if not f.startswith("--xla_"):
            raise LaunchError(f"--xla-flag={f!r}: XLA flags look like --xla_NAME=VALUE")
    env = [("XLA_FLAGS", " ".join([*GPU_XLA_FLAGS, *extra_xla_flags])),
           ("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{mem_fraction:g}")]
    return env + list(SINGLE_HOST_NCCL_ENV) if single_host else env


def add_gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mem-fraction", type=float, default=GPU_MEM_FRACTION,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION: the share of each GPU's memory JAX takes")
    parser.add_argument("--xla-flag", action="append", default=[], metavar="FLAG",
                        help=f"another XLA flag (repeatable), added to {' '.join(GPU_XLA_FLAGS)}")


def is_node_local(path: str) -> bool:
    """A path under /tmp, /var/tmp or /dev/shm: different on every machine."""
    norm = os.path.normpath(path)
    return any(norm == p or norm.startswith(p + "/") for p in NODE_LOCAL_PREFIXES)


def render(commands: Sequence[Argv]) -> str:
    """One shell-quoted line per command (shlex.split of a line gives its argv back)."""
    return "".join(shlex.join(c) + "\n" for c in commands)


def execute(plan: Plan, *, out: TextIO = sys.stderr) -> int:
    """Runs a plan (see Plan for the order and failure rules); returns the run's exit status."""
    for argv in plan.setup:
        print("+", shlex.join(argv), file=out, flush=True)
        rc = subprocess.run(argv).returncode
        if rc:
            print(f"setup command failed with exit status {rc}: {shlex.join(argv)}", file=out)
            return rc
    try:
        rc = _run_parallel(plan, out) if plan.parallel else _run_serial(plan, out)
    finally:
        for argv in plan.collect:
            print("+", shlex.join(argv), file=out, flush=True)
            subprocess.run(argv)
    return rc


def _run_serial(plan: Plan, out: TextIO) -> int:
    for argv in plan.run:
        print("+", shlex.join(argv), file=out, flush=True)
        rc = subprocess.run(argv).returncode
        if rc:
            return rc
    return 0


def _run_parallel(plan: Plan, out: TextIO) -> int:
    """All run commands at once (processes that join one jax.distributed job must all start); the first
    to fail stops the others, which would otherwise wait for it until their collectives time out."""
    procs, files = [], []
    try:
        for i, argv in enumerate(plan.run):
            log = plan.run_logs[i] if i < len(plan.run_logs) else ""
            print("+", shlex.join(argv), *([">", log] if log else []), file=out, flush=True)
            f = open(log, "w") if log else None
            files.append(f)
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT if f else None))
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c), 0)
            if failed or all(c is not None for c in codes):
                return failed
            time.sleep(1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        for f in files:
            if f:
                f.close()


def run_plan_cli(parser: argparse.ArgumentParser, build, argv: Sequence[str]) -> int:
    """The command line of a launcher whose work is one Plan: parse (overrides after the flags),
    `build(ns, overrides)` the plan (a LaunchError becomes the parser's usage error, exit 2),
    then print its commands (--dry-run) or run them; returns the exit status."""
    ns, overrides = parse_with_overrides(parser, argv)
    try:
        plan = build(ns, overrides)
    except LaunchError as e:
        parser.error(str(e))
    if ns.dry_run:
        sys.stdout.write(render(plan.commands()))
        return 0
    return execute(plan)
