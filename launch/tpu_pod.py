"""Run lit_jax on every worker of a Cloud TPU VM slice, from a machine with gcloud.

    python -m launch.tpu_pod --name=lit-v4 --zone=us-central2-b --accelerator-type=v4-32 --create \\
        --config=configs/llama3_8b.py --workdir=gs://BUCKET/runs/llama3 \\
        --config.model.source=/mnt/models/Meta-Llama-3-8B-Instruct --dry-run

Steps, each a gcloud command (all printed by --dry-run):
  1. create the slice (--create; --spot/--preemptible) or check that it exists (`describe`);
  2. copy the code: `git archive` of --ref here, `scp --worker=all`, unpacked into ~/lit_jax on every
     worker; or, with --git-url, every worker clones/fetches that repository at --ref;
  3. install (unless --skip-install): a venv in ~/lit_jax with `pip install -e . jax[tpu]`;
  4. run the same `python -m lit_jax.main ... --config.mesh.distributed=True` on all workers at once
     (`ssh --worker=all`; jax.distributed.initialize() finds the other workers by itself on Cloud
     TPU), each worker's output also written to ~/lit_jax/logs/RUN.log;
  5. copy each worker's log here, to --log-dir/worker-<i>.log (also when the run failed).

Checkpoints go to --workdir; on a slice of several workers it must be shared storage (a gs://
bucket; or a mount every worker sees, declared with --shared-workdir), since every worker writes
its shards of each checkpoint there.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import shlex
import sys
from typing import Sequence

from launch import common
from launch.common import Argv, LaunchError, Plan

# Software version ("runtime") per TPU generation, from Cloud TPU's "TPU software versions" page
# (the versions it lists for JAX and PyTorch).
RUNTIME_VERSIONS = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
                    "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
# Generations whose accelerator-type number counts TensorCores, 8 per host (4 chips of 2 cores): v4-32 is
# 16 chips on 4 hosts. v5litepod-N and v6e-N count chips, one core each.
CORES_PER_HOST = {"v2": 8, "v3": 8, "v4": 8, "v5p": 8}
# v5e/v6e slice sizes (chips); up to 8 chips is one host. Larger slices: Google's pages disagree on
# chips per host between VM types, so the launcher asks for --workers rather than guess.
CHIP_SLICES = {"v5litepod": (1, 4, 8, 16, 32, 64, 128, 256), "v6e": (1, 4, 8, 16, 32, 64, 128, 256)}
ACCELERATOR_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Compute Engine resource name
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")  # us-central2-b, europe-west4-a
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_accelerator(accelerator_type: str) -> tuple[str, int]:
    """`v4-32` -> ("v4", 32); a clear error naming --accelerator-type for anything else."""
    m = ACCELERATOR_RE.match(accelerator_type)
    if not m:
        raise LaunchError(f"--accelerator-type={accelerator_type!r}: expected GENERATION-SIZE with GENERATION one of "
                          f"{', '.join(RUNTIME_VERSIONS)} (e.g. v4-32, v5p-128, v5litepod-256, v6e-64)")
    gen, size = m.group(1), int(m.group(2))
    if gen in CORES_PER_HOST and size % CORES_PER_HOST[gen]:
        raise LaunchError(f"--accelerator-type={accelerator_type}: {gen} sizes count TensorCores, "
                          f"a multiple of {CORES_PER_HOST[gen]} ({gen}-8, {gen}-16, {gen}-32, ...)")
    if gen in CHIP_SLICES and size not in CHIP_SLICES[gen]:
        raise LaunchError(f"--accelerator-type={accelerator_type}: {gen} slices have "
                          f"{', '.join(map(str, CHIP_SLICES[gen]))} chips")
    return gen, size


def worker_count(accelerator_type: str, workers: int | None) -> int:
    """Hosts (TPU VM workers) of the slice: --workers if given, else derived from the accelerator type."""
    gen, size = parse_accelerator(accelerator_type)
    if workers is not None:
        if workers < 1:
            raise LaunchError(f"--workers={workers}: must be >= 1")
        return workers
    if gen in CORES_PER_HOST:
        return max(1, size // CORES_PER_HOST[gen])
    if size <= 8:
        return 1
    raise LaunchError(f"--workers: pass the worker count of a {accelerator_type} slice (`gcloud compute tpus tpu-vm "
                      "describe NAME --zone=ZONE` lists one networkEndpoint per worker)")


def run_name(ns: argparse.Namespace) -> str:
    """--run-name, else the last part of the work dir (gs://b/runs/llama3 -> llama3): the log files' name."""
    if ns.run_name:
        return ns.run_name
    return re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(ns.workdir.rstrip("/"))) or "run"


def validate(ns: argparse.Namespace) -> int:
    """Checks every argument that gcloud would refuse late (or not at all); returns the worker count."""
    if not NAME_RE.match(ns.name):
        raise LaunchError(f"--name={ns.name!r}: a TPU name is lowercase letters, digits and hyphens, "
                          "starting with a letter (at most 63)")
    if not ZONE_RE.match(ns.zone):
        raise LaunchError(f"--zone={ns.zone!r}: expected a zone like us-central2-b or europe-west4-a")
    if ns.spot and ns.preemptible:
        raise LaunchError("--spot and --preemptible: pick one (Spot VMs are the newer form of preemptible ones)")
    if (ns.spot or ns.preemptible) and not ns.create:
        raise LaunchError(f"{'--spot' if ns.spot else '--preemptible'}: only applies with --create")
    if not SAFE_NAME_RE.match(run_name(ns)):
        raise LaunchError(f"--run-name={run_name(ns)!r}: letters, digits, '.', '_' and '-' only")
    if ns.remote_dir.startswith("/") or ".." in ns.remote_dir.split("/") or not ns.remote_dir.strip("/"):
        raise LaunchError(f"--remote-dir={ns.remote_dir!r}: a directory under the workers' home, e.g. lit_jax")
    workers = worker_count(ns.accelerator_type, ns.workers)
    if workers > 1 and not ns.workdir.startswith("gs://") and not ns.shared_workdir:
        raise LaunchError(f"--workdir={ns.workdir}: a {workers}-worker slice needs shared storage for checkpoints "
                          "(every worker writes its shards there): use a gs:// bucket, or pass --shared-workdir "
                          "if this path is a mount every worker shares")
    if not ns.ref or ns.ref.startswith("-"):
        raise LaunchError(f"--ref={ns.ref!r}: not a git revision")
    return workers


def gcloud(verb: str, ns: argparse.Namespace, *args: str) -> Argv:
    """`gcloud compute tpus tpu-vm VERB ... --zone=Z [--project=P]`."""
    project = [f"--project={ns.project}"] if ns.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={ns.zone}", *project]


def on_all_workers(ns: argparse.Namespace, command: str) -> Argv:
    """The same shell command on every worker at once (gcloud runs --worker=all in parallel)."""
    return gcloud("ssh", ns, ns.name, "--worker=all", f"--command={command}")


def slice_command(ns: argparse.Namespace) -> Argv:
    """Create the slice, or `describe` it: fails at once, before any copy, if it does not exist."""
    if not ns.create:
        return gcloud("describe", ns, ns.name)
    version = ns.runtime_version or RUNTIME_VERSIONS[parse_accelerator(ns.accelerator_type)[0]]
    kind = ["--spot"] if ns.spot else ["--preemptible"] if ns.preemptible else []
    return gcloud("create", ns, ns.name, f"--accelerator-type={ns.accelerator_type}", f"--version={version}", *kind)


def copy_commands(ns: argparse.Namespace, log_dir: str) -> list[Argv]:
    """The code onto every worker, into ~/REMOTE_DIR (kept between runs, so its venv is reused).

    Default: `git archive` of --ref (committed files only: what runs is a commit, not a work tree)
    copied to all workers and unpacked over the directory. --git-url: each worker fetches --ref."""
    d = shlex.quote(ns.remote_dir)
    if ns.git_url:
        url, ref = shlex.quote(ns.git_url), shlex.quote(ns.ref)
        return [on_all_workers(ns, f"{{ test -d {d}/.git || git clone --quiet {url} {d}; }} && "
                                   f"git -C {d} fetch --quiet origin {ref} && "
                                   f"git -C {d} checkout --quiet --detach FETCH_HEAD")]
    archive = posixpath.join(log_dir, "lit_jax.tar.gz")
    remote_archive = f"{ns.remote_dir.rstrip('/')}.tar.gz"
    return [["git", "archive", "--format=tar.gz", f"--output={archive}", ns.ref],
            gcloud("scp", ns, archive, f"{ns.name}:{remote_archive}", "--worker=all"),
            on_all_workers(ns, f"mkdir -p {d} && tar -xzf {shlex.quote(remote_archive)} -C {d}")]


def install_command(ns: argparse.Namespace) -> Argv:
    """A venv with lit_jax and jax[tpu] on every worker (JAX's install page: pip install -U "jax[tpu]")."""
    d, py = shlex.quote(ns.remote_dir), shlex.quote(ns.python)
    return on_all_workers(ns, f"cd {d} && {py} -m venv .venv && . .venv/bin/activate && "
                              "pip install --quiet --upgrade pip && pip install --quiet -e . 'jax[tpu]'")


def run_command(ns: argparse.Namespace, overrides: Sequence[str]) -> Argv:
    """lit_jax.main on all workers, with --config.mesh.distributed=True, its output also in logs/RUN.log.

    pipefail: the exit status is lit_jax's, not tee's (the workers' login shell is bash)."""
    d = shlex.quote(ns.remote_dir)
    argv = common.main_argv(ns.config, ns.workdir, overrides, distributed=True)
    log = shlex.quote(f"logs/{run_name(ns)}.log")
    return on_all_workers(ns, f"cd {d} && . .venv/bin/activate && mkdir -p logs && set -o pipefail && "
                              f"{shlex.join(argv)} 2>&1 | tee {log}")


def collect_commands(ns: argparse.Namespace, workers: int, log_dir: str) -> list[Argv]:
    """Each worker's log here, one scp per worker (scp --worker=all would write them onto one file)."""
    remote = f"{ns.name}:{ns.remote_dir.rstrip('/')}/logs/{run_name(ns)}.log"
    return [gcloud("scp", ns, remote, posixpath.join(log_dir, f"worker-{i}.log"), f"--worker={i}")
            for i in range(workers)]


def build_plan(ns: argparse.Namespace, overrides: Sequence[str]) -> Plan:
    """All commands for these arguments (validated first; LaunchError names the bad flag)."""
    workers = validate(ns)
    log_dir = ns.log_dir or posixpath.join("logs", "tpu", ns.name, run_name(ns))
    setup = [["mkdir", "-p", log_dir], slice_command(ns), *copy_commands(ns, log_dir)]
    if not ns.skip_install:
        setup.append(install_command(ns))
    return Plan(setup=tuple(setup), run=(run_command(ns, overrides),),
                collect=tuple(collect_commands(ns, workers, log_dir)))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu_pod", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other arguments --config.KEY=VALUE (or all after --) go to lit_jax.main.")
    common.add_job_args(p, workdir_required=True)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5p-128, v5litepod-256, v6e-64")
    p.add_argument("--workers", type=int, default=None,
                   help="worker (host) count; default: from the accelerator type (v2-v5p); "
                        "needed for v5litepod/v6e over 8 chips")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
    p.add_argument("--create", action="store_true", help="create the slice (default: it must exist)")
    p.add_argument("--spot", action="store_true", help="with --create: a Spot slice")
    p.add_argument("--preemptible", action="store_true", help="with --create: a preemptible slice")
    p.add_argument("--runtime-version", default=None, help="TPU software version; default: per generation")
    p.add_argument("--git-url", default=None, help="workers clone this repository instead of receiving an archive")
    p.add_argument("--ref", default="HEAD", help="git revision to run (archived here, or fetched with --git-url)")
    p.add_argument("--remote-dir", default="lit_jax", help="code directory under each worker's home")
    p.add_argument("--python", default="python3", help="interpreter for the venv on the workers (needs >= 3.11)")
    p.add_argument("--skip-install", action="store_true", help="reuse the workers' venv as it is")
    p.add_argument("--shared-workdir", action="store_true",
                   help="the --workdir path (not gs://) is a mount every worker shares")
    p.add_argument("--run-name", default=None, help="log file name; default: the work dir's last part")
    p.add_argument("--log-dir", default=None, help="where the workers' logs are copied; default logs/tpu/NAME/RUN")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_plan_cli(make_parser(), build_plan, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
