"""Run lit_jax on the GPUs of this machine: one process over all of them, or one process per GPU.

    python -m launch.local_gpu --config=configs/llama3_8b.py --workdir=runs/llama3 \\
        --config.model.source=/models/Meta-Llama-3-8B-Instruct --dry-run
    python -m launch.local_gpu --per-gpu --gpus=8 --config=configs/llama3_8b.py --workdir=runs/llama3 --dry-run

Default: one process; JAX sees every local GPU (or those of --gpus) and the config's mesh
(`--config.mesh.shape`, default all devices on one axis) spans them. --per-gpu: one process per GPU,
joined by jax.distributed on localhost (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; JAX_LOCAL_DEVICE_IDS gives each its GPU), all started at once, each writing
--log-dir/process-<i>.log; data.batch_size is per process, so the global batch is batch_size x GPUs.
Both get the GPU XLA flags and the single-host NCCL settings of JAX's GPU performance tips.
"""

from __future__ import annotations

import argparse
import posixpath
import shutil
import subprocess
import sys
from typing import Sequence

from launch import common
from launch.common import Argv, LaunchError, Plan


def parse_gpus(gpus: str) -> list[int]:
    """`8` -> GPUs 0..7; `2,3` -> GPUs 2 and 3 (ids as nvidia-smi numbers them)."""
    try:
        if "," not in gpus:
            count = int(gpus)
            if count < 1:
                raise ValueError
            return list(range(count))
        ids = [int(g) for g in gpus.split(",")]
    except ValueError:
        raise LaunchError(f"--gpus={gpus!r}: a GPU count (8) or comma-separated GPU ids (0,1,2,3)") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise LaunchError(f"--gpus={gpus!r}: GPU ids must be distinct and >= 0")
    return ids


def process_argvs(ns: argparse.Namespace, overrides: Sequence[str], gpus: list[int] | None) -> list[Argv]:
    """The run commands: one `env ... python -m lit_jax.main ...`, or one per GPU (--per-gpu)."""
    env = common.gpu_env(ns.mem_fraction, ns.xla_flag, single_host=True)
    if not ns.per_gpu:
        if gpus is not None:
            env.append(("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpus))))
        return [common.env_prefix(env) + common.main_argv(ns.config, ns.workdir, overrides, distributed=False,
                                                          python=ns.python)]
    if gpus is None:
        raise LaunchError("--gpus: --per-gpu needs the GPUs (a count or ids); nvidia-smi could not count them")
    if not 1024 <= ns.port <= 65535:
        raise LaunchError(f"--port={ns.port}: must be in [1024, 65535]")
    return [common.env_prefix([*env, ("JAX_COORDINATOR_ADDRESS", f"localhost:{ns.port}"),
                               ("JAX_NUM_PROCESSES", str(len(gpus))), ("JAX_PROCESS_ID", str(i)),
                               ("JAX_LOCAL_DEVICE_IDS", str(gpu))])
            + common.main_argv(ns.config, ns.workdir, overrides, distributed=True, python=ns.python)
            for i, gpu in enumerate(gpus)]


def build_plan(ns: argparse.Namespace, overrides: Sequence[str], detected_gpus: int | None = None) -> Plan:
    """All commands; detected_gpus: the local GPU count when --gpus is not given (main asks nvidia-smi)."""
    gpus = parse_gpus(ns.gpus) if ns.gpus else (list(range(detected_gpus)) if detected_gpus else None)
    run = process_argvs(ns, overrides, gpus)
    if not ns.per_gpu:
        return Plan(run=tuple(run))
    logs = tuple(posixpath.join(ns.log_dir, f"process-{i}.log") for i in range(len(run)))
    return Plan(setup=(["mkdir", "-p", ns.log_dir],), run=tuple(run), parallel=True, run_logs=logs)


def count_gpus() -> int | None:
    """Local NVIDIA GPUs by `nvidia-smi --list-gpus` (one line each); None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) or None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.local_gpu", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other arguments --config.KEY=VALUE (or all after --) go to lit_jax.main.")
    common.add_job_args(p, workdir_required=False)
    p.add_argument("--gpus", default=None,
                   help="GPU count or ids (default: all; --per-gpu counts them with nvidia-smi)")
    p.add_argument("--per-gpu", action="store_true", help="one process per GPU, joined by jax.distributed")
    p.add_argument("--port", type=int, default=12355, help="--per-gpu: coordinator port on localhost (any free one)")
    p.add_argument("--log-dir", default="logs/local", help="--per-gpu: one log file per process here")
    p.add_argument("--python", default="python", help="interpreter (default: python, e.g. the active venv's)")
    common.add_gpu_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_plan_cli(
        make_parser(), lambda ns, overrides: build_plan(ns, overrides, None if ns.gpus or not ns.per_gpu else count_gpus()),
        sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
