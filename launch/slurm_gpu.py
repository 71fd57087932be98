"""Submit lit_jax to a SLURM GPU cluster: writes an sbatch script and runs `sbatch` on it.

    python -m launch.slurm_gpu --nodes=2 --gpus-per-node=8 --cpus-per-node=96 --partition=gpu \\
        --config=configs/llama3_8b.py --workdir=/shared/runs/llama3 \\
        --config.model.source=/shared/models/Meta-Llama-3-8B-Instruct --dry-run

Run it from the repository root on the cluster's login node, with the venv made once:
`python3 -m venv .venv && . .venv/bin/activate && pip install -e . 'jax[cuda12]'`.

The script runs `srun python -m lit_jax.main ... --config.mesh.distributed=True`: one process per
node driving all its GPUs (default), or one per GPU (--per-gpu, which JAX's GPU performance tips
recommend trying). jax.distributed.initialize() reads SLURM's environment inside srun: the
coordinator is the first host of SLURM_STEP_NODELIST (port from the job id, or
--coordinator-port), the process id SLURM_PROCID, and each process drives GPU number
SLURM_LOCALID, which is right for --per-gpu; one process per node therefore sets
JAX_LOCAL_DEVICE_IDS to all the node's GPUs (jax-ml/jax#16788). data.batch_size is per process:
the global batch is batch_size x processes, so --per-gpu multiplies it by the GPUs per node.
--dry-run prints the script as a heredoc that writes it, then the sbatch command.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import shlex
import sys
from typing import Sequence

from launch import common
from launch.common import Argv, LaunchError, Plan

TIME_RE = re.compile(r"^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$")  # SLURM's MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
WORD_RE = re.compile(r"^[A-Za-z0-9._,:-]+$")  # a partition, account or job name (no spaces or quotes)
PATH_RE = re.compile(r"^[A-Za-z0-9._/-]+$")  # goes into an #SBATCH line, which sbatch splits at spaces
HEREDOC_END = "LIT_JAX_SBATCH_EOF"


def tasks_per_node(ns: argparse.Namespace) -> int:
    return ns.gpus_per_node if ns.per_gpu else 1


def validate(ns: argparse.Namespace) -> None:
    """Refuses arguments that sbatch would refuse after queueing, or that break a multi-node run."""
    if ns.nodes < 1:
        raise LaunchError(f"--nodes={ns.nodes}: must be >= 1")
    if ns.gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node={ns.gpus_per_node}: must be >= 1")
    if ns.cpus_per_node is not None and ns.cpus_per_node < tasks_per_node(ns):
        raise LaunchError(f"--cpus-per-node={ns.cpus_per_node}: fewer CPUs than the {tasks_per_node(ns)} "
                          "processes per node")
    if not TIME_RE.match(ns.time):
        raise LaunchError(f"--time={ns.time!r}: SLURM time limits look like 90, 24:00:00 or 2-00:00:00")
    for flag, value in (("--job-name", ns.job_name), ("--partition", ns.partition), ("--account", ns.account)):
        if value is not None and not WORD_RE.match(value):
            raise LaunchError(f"{flag}={value!r}: letters, digits and . _ , : - only")
    if ns.nodes > 1 and common.is_node_local(ns.workdir):
        raise LaunchError(f"--workdir={ns.workdir}: a {ns.nodes}-node run needs shared storage for checkpoints "
                          "(every process writes its shards there); /tmp, /var/tmp and /dev/shm are per node")
    if not PATH_RE.match(ns.log_dir):
        raise LaunchError(f"--log-dir={ns.log_dir!r}: #SBATCH --output takes no spaces or quotes; "
                          "letters, digits and . _ / - only")
    if ns.coordinator_port is not None and not 1024 <= ns.coordinator_port <= 65535:
        raise LaunchError(f"--coordinator-port={ns.coordinator_port}: must be in [1024, 65535]")
    for arg in ns.sbatch_arg:
        if not arg.startswith("--") or "\n" in arg:
            raise LaunchError(f"--sbatch-arg={arg!r}: one sbatch option, e.g. --sbatch-arg=--exclusive")


def sbatch_lines(ns: argparse.Namespace) -> list[str]:
    """The #SBATCH header."""
    tasks = tasks_per_node(ns)
    opts = [f"--job-name={ns.job_name}", f"--nodes={ns.nodes}", f"--ntasks-per-node={tasks}",
            # All GPUs visible to every task (no --gpus-per-task): JAX picks GPU SLURM_LOCALID per process.
            f"--gpus-per-node={ns.gpus_per_node}", f"--time={ns.time}",
            f"--output={posixpath.join(ns.log_dir, '%x-%j.out')}"]
    if ns.cpus_per_node is not None:
        # JAX's tips: the node's CPUs divided among its processes; GPU collectives need host CPUs.
        opts.append(f"--cpus-per-task={ns.cpus_per_node // tasks}")
    opts += [f"--partition={ns.partition}"] * bool(ns.partition) + [f"--account={ns.account}"] * bool(ns.account)
    return [f"#SBATCH {o}" for o in [*opts, *ns.sbatch_arg]]


def environment(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """What every process gets: the GPU XLA/NCCL settings, the device ids, the coordinator port."""
    env = common.gpu_env(ns.mem_fraction, ns.xla_flag, single_host=ns.nodes == 1)
    if not ns.per_gpu:
        env.append(("JAX_LOCAL_DEVICE_IDS", ",".join(str(i) for i in range(ns.gpus_per_node))))
    if not PATH_RE.match(ns.log_dir):
        raise LaunchError(f"--log-dir={ns.log_dir!r}: #SBATCH --output takes no spaces or quotes; "
                          "letters, digits and . _ / - only")
    if ns.coordinator_port is not None:
        env.append(("JAX_COORDINATOR_PORT", str(ns.coordinator_port)))
    return env


def srun_argv(ns: argparse.Namespace, overrides: Sequence[str]) -> Argv:
    """`srun` (its environment is what jax.distributed.initialize detects) with one log file per process;
    --kill-on-bad-exit: a process that dies ends the step instead of leaving the rest waiting on it."""
    per_task_log = posixpath.join(ns.log_dir, "%x-%j-task%t.out")
    return ["srun", "--kill-on-bad-exit=1", f"--output={per_task_log}",
            *common.main_argv(ns.config, ns.workdir, overrides, distributed=True)]


def script_text(ns: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The sbatch script (validated arguments)."""
    validate(ns)
    lines = ["#!/bin/bash", "# lit_jax on SLURM, written by python -m launch.slurm_gpu", *sbatch_lines(ns),
             "set -euo pipefail"]
    if ns.chdir:
        lines.append(f"cd {shlex.quote(ns.chdir)}")
    if ns.venv:
        lines.append(f". {shlex.quote(posixpath.join(ns.venv, 'bin', 'activate'))}")
    if not ns.per_gpu:
        lines.append(f"# One process drives all {ns.gpus_per_node} GPUs of its node; without JAX_LOCAL_DEVICE_IDS, "
                     "jax.distributed.initialize() under SLURM would give it only GPU number SLURM_LOCALID (0).")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in environment(ns)]
    lines += ["# Coordinator (first host of SLURM_STEP_NODELIST), process count and ids: detected by JAX in srun.",
              shlex.join(srun_argv(ns, overrides))]
    return "\n".join(lines) + "\n"


def script_path(ns: argparse.Namespace) -> str:
    return ns.script or posixpath.join(ns.log_dir, f"{ns.job_name}.sbatch")


def build_plan(ns: argparse.Namespace) -> Plan:
    """mkdir for the logs and the script (SLURM does not create --output's directory), then sbatch."""
    dirs = sorted({ns.log_dir, posixpath.dirname(script_path(ns)) or "."} - {"."})
    return Plan(setup=(["mkdir", "-p", *dirs],) if dirs else (), run=(["sbatch", script_path(ns)],))


def render_dry_run(ns: argparse.Namespace, overrides: Sequence[str]) -> str:
    """What --dry-run prints: shell that does what the launcher does (mkdir, write the script, sbatch)."""
    plan, text = build_plan(ns), script_text(ns, overrides)
    write = f"cat > {shlex.quote(script_path(ns))} <<'{HEREDOC_END}'\n{text}{HEREDOC_END}\n"
    return common.render(plan.setup) + write + common.render(plan.run)


def notes(ns: argparse.Namespace) -> list[str]:
    """Advice printed to stderr (not errors)."""
    out = []
    if ns.cpus_per_node is None:
        out.append("note: no --cpus-per-node, so SLURM's default CPUs per task apply; JAX's GPU tips advise the "
                   "node's CPUs divided among its processes (e.g. --cpus-per-node=96)")
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.slurm_gpu", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other arguments --config.KEY=VALUE (or all after --) go to lit_jax.main.")
    common.add_job_args(p, workdir_required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--per-gpu", action="store_true", help="one process per GPU (default: one per node)")
    p.add_argument("--cpus-per-node", type=int, default=None, help="CPUs of a node, shared among its processes")
    p.add_argument("--time", default="24:00:00", help="time limit")
    p.add_argument("--job-name", default="lit_jax")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option (repeatable), e.g. --sbatch-arg=--exclusive")
    p.add_argument("--venv", default=".venv", help="virtualenv activated by the job ('' = none)")
    p.add_argument("--chdir", default=None, help="repository root on the cluster (default: where sbatch runs)")
    p.add_argument("--log-dir", default="logs/slurm", help="job and per-process logs")
    p.add_argument("--script", default=None, help="where to write the script (default: LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--coordinator-port", type=int, default=None,
                   help="JAX_COORDINATOR_PORT (default: JAX derives one from the job id)")
    common.add_gpu_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    ns, overrides = common.parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    try:
        text = render_dry_run(ns, overrides) if ns.dry_run else script_text(ns, overrides)
    except LaunchError as e:
        parser.error(str(e))
    for note in notes(ns):
        print(note, file=sys.stderr)
    if ns.dry_run:
        sys.stdout.write(text)
        return 0
    plan = build_plan(ns)
    rc = common.execute(common.Plan(setup=plan.setup))
    if rc:
        return rc
    with open(script_path(ns), "w") as f:
        f.write(text)
    os.chmod(script_path(ns), 0o755)
    return common.execute(common.Plan(run=plan.run))


if __name__ == "__main__":
    sys.exit(main())
