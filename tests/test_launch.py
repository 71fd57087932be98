"""The launchers' commands (launch/): exact argv for a few argument sets, quoting that survives the
shell, clear errors for bad arguments, and one `--dry-run` through each CLI. Nothing here touches
gcloud, SLURM or a GPU: commands are built by pure functions and only printed; where a shell must
parse them, bash runs them against stand-in `python` / `srun` scripts that print their argv.
"""

import io
import os
import shlex
import subprocess
import sys
import time

import pytest

from launch import common, local_gpu, slurm_gpu, tpu_pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overrides a shell mangles easily: parentheses and double quotes; a space and apostrophes.
SOURCES = '--config.data.sources=("latentqa/eval/system.json",)'
QUESTION = "--config.read.questions=(\"What's the assistant's persona?\",)"
OVERRIDES = [SOURCES, QUESTION]
MAIN = ["python", "-m", "lit_jax.main", "--config=configs/llama3_8b.py", "--workdir=gs://bucket/runs/llama3",
        SOURCES, QUESTION, "--config.mesh.distributed=True"]


def parse(module, argv):
    """(namespace, overrides) as the launcher's CLI parses them."""
    return common.parse_with_overrides(module.make_parser(), argv)


def tpu_plan(*extra, workdir="gs://bucket/runs/llama3", accel="v4-32"):
    ns, overrides = parse(tpu_pod, ["--name=lit-v4", "--zone=us-central2-b", f"--accelerator-type={accel}",
                                    "--config=configs/llama3_8b.py", f"--workdir={workdir}", *extra, *OVERRIDES])
    return tpu_pod.build_plan(ns, overrides)


def cli_error(module, argv, capsys) -> str:
    """The message of an argument the launcher refuses (argparse exits 2 with it on stderr)."""
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def remote_command(argv) -> str:
    return next(a for a in argv if a.startswith("--command="))[len("--command="):]


def fake_program(directory, name: str) -> None:
    """An executable `name` that prints its arguments, NUL-terminated, so a test sees exactly what the
    shell passed."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    os.chmod(path, 0o755)


# --- TPU pod ---------------------------------------------------------------------------------------

def test_tpu_commands_for_a_new_spot_slice():
    plan = tpu_plan("--create", "--spot", "--project=my-proj")
    gc = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b", "--project=my-proj"]
    logs = "logs/tpu/lit-v4/llama3"
    run = ("cd lit_jax && . .venv/bin/activate && mkdir -p logs && set -o pipefail && "
           f"{shlex.join(MAIN)} 2>&1 | tee logs/llama3.log")
    assert plan.commands() == [
        ["mkdir", "-p", logs],
        [*gc, "create", "lit-v4", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot", *where],
        ["git", "archive", "--format=tar.gz", f"--output={logs}/lit_jax.tar.gz", "HEAD"],
        [*gc, "scp", f"{logs}/lit_jax.tar.gz", "lit-v4:lit_jax.tar.gz", "--worker=all", *where],
        [*gc, "ssh", "lit-v4", "--worker=all", "--command=mkdir -p lit_jax && tar -xzf lit_jax.tar.gz -C lit_jax",
         *where],
        [*gc, "ssh", "lit-v4", "--worker=all", "--command=cd lit_jax && python3 -m venv .venv && . .venv/bin/activate"
         " && pip install --quiet --upgrade pip && pip install --quiet -e . 'jax[tpu]'", *where],
        [*gc, "ssh", "lit-v4", "--worker=all", f"--command={run}", *where],
        *([*gc, "scp", "lit-v4:lit_jax/logs/llama3.log", f"{logs}/worker-{i}.log", f"--worker={i}", *where]
          for i in range(4)),  # v4-32: 16 chips, 4 hosts
    ]


def test_tpu_existing_slice_from_git_without_install():
    plan = tpu_plan("--git-url=https://example.com/me/lit jax.git", "--ref=v1.2", "--skip-install",
                    "--remote-dir=code/lit", "--run-name=try-1", "--log-dir=/tmp/l")
    commands = plan.commands()
    assert commands[1] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "lit-v4", "--zone=us-central2-b"]
    assert remote_command(commands[2]) == (
        "{ test -d code/lit/.git || git clone --quiet 'https://example.com/me/lit jax.git' code/lit; } && "
        "git -C code/lit fetch --quiet origin v1.2 && git -C code/lit checkout --quiet --detach FETCH_HEAD")
    assert len(commands) == 4 + 4 and "pip install" not in " ".join(commands[3])
    assert commands[-1][5:7] == ["lit-v4:code/lit/logs/try-1.log", "/tmp/l/worker-3.log"]


def test_tpu_printed_lines_give_back_the_argv_and_the_workers_shell_gives_back_main(tmp_path):
    plan = tpu_plan("--create")
    lines = common.render(plan.commands()).splitlines()
    assert [shlex.split(line) for line in lines] == plan.commands()
    # What each worker's shell makes of --command: run it in bash with `python` standing in.
    (tmp_path / "lit_jax" / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "lit_jax" / ".venv" / "bin" / "activate").write_text("")
    fake_program(tmp_path, "python")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", remote_command(plan.run[0])], cwd=tmp_path, env=env, capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(b"\0")[:-1] == [a.encode() for a in MAIN[1:]]
    assert (tmp_path / "lit_jax" / "logs" / "llama3.log").read_bytes() == out.stdout  # the log the scp collects


@pytest.mark.parametrize("accel, workers, expected", [
    ("v4-8", None, 1), ("v4-32", None, 4), ("v5p-128", None, 16), ("v3-32", None, 4),
    ("v5litepod-8", None, 1), ("v5litepod-256", "--workers=64", 64), ("v6e-64", "--workers=8", 8)])
def test_tpu_worker_count(accel, workers, expected):
    plan = tpu_plan(*([workers] if workers else []), accel=accel)
    assert [c[-2] for c in plan.collect] == [f"--worker={i}" for i in range(expected)]


@pytest.mark.parametrize("accel", ["v4_32", "v7-8", "tpu-v4-32", "v4-12", "v5litepod-12", "v6e-0"])
def test_tpu_refuses_unknown_accelerator_types(accel, capsys):
    err = cli_error(tpu_pod, ["--name=t", "--zone=us-central2-b", f"--accelerator-type={accel}",
                              "--config=configs/llama3_8b.py", "--workdir=gs://b/r", "--dry-run"], capsys)
    assert f"--accelerator-type={accel}" in err or f"--accelerator-type='{accel}'" in err


def test_tpu_needs_the_worker_count_where_it_is_not_derived(capsys):
    err = cli_error(tpu_pod, ["--name=t", "--zone=us-central2-b", "--accelerator-type=v5litepod-256",
                              "--config=configs/llama3_8b.py", "--workdir=gs://b/r", "--dry-run"], capsys)
    assert "--workers" in err


def test_tpu_multi_host_workdir_must_be_shared(capsys):
    err = cli_error(tpu_pod, ["--name=t", "--zone=us-central2-b", "--accelerator-type=v4-32",
                              "--config=configs/llama3_8b.py", "--workdir=/home/me/run", "--dry-run"], capsys)
    assert "--workdir=/home/me/run" in err and "gs://" in err and "--shared-workdir" in err
    # One host: its own disk is fine; a mount the user declares shared is accepted.
    assert tpu_plan(workdir="/home/me/run", accel="v4-8").run
    assert tpu_plan("--shared-workdir", workdir="/mnt/filestore/run").run


def tpu_argv(*extra, **replace):
    """A valid tpu_pod command line with some flags replaced (name -> --name=...) and others added."""
    flags = {"name": "t", "zone": "us-central2-b", "accelerator_type": "v4-8", "config": "c.py", "workdir": "gs://b/r",
             **replace}
    return [*(f"--{k.replace('_', '-')}={v}" for k, v in flags.items()), "--dry-run", *extra]


@pytest.mark.parametrize("argv, flag", [
    (tpu_argv(zone="us-central2"), "--zone"), (tpu_argv(name="My_TPU"), "--name"),
    (tpu_argv("--create", "--spot", "--preemptible"), "--spot"), (tpu_argv("--spot"), "--spot"),
    (tpu_argv(remote_dir="/opt/lit"), "--remote-dir"), (tpu_argv(run_name="a b"), "--run-name"),
    (tpu_argv("stray"), "'stray'"), (tpu_argv("--config.mesh.distributed=False"), "--config.mesh.distributed"),
    (tpu_argv("--", "--workdir=x"), "--workdir=x"), (tpu_argv("--unknown-flag"), "--unknown-flag"),
    (tpu_argv(ref="--upload-pack=x"), "--ref")])
def test_tpu_bad_arguments_name_their_flag(argv, flag, capsys):
    assert flag in cli_error(tpu_pod, argv, capsys)


# --- SLURM -----------------------------------------------------------------------------------------

def slurm(*extra, workdir="/shared/runs/llama3"):
    return parse(slurm_gpu, ["--config=configs/llama3_8b.py", f"--workdir={workdir}", *extra, *OVERRIDES])


def test_slurm_script_one_process_per_node():
    ns, overrides = slurm("--nodes=2", "--cpus-per-node=96", "--partition=gpu", "--account=lab")
    text = slurm_gpu.script_text(ns, overrides)
    lines = text.splitlines()
    for option in ["--job-name=lit_jax", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                   "--cpus-per-task=96", "--time=24:00:00", "--output=logs/slurm/%x-%j.out", "--partition=gpu",
                   "--account=lab"]:
        assert f"#SBATCH {option}" in lines
    assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in lines
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines  # else JAX drives only GPU 0 of each node
    assert "NCCL_" not in text  # JAX's NCCL settings are for one host
    assert ". .venv/bin/activate" in lines
    srun = shlex.split(lines[-1])
    assert srun == ["srun", "--kill-on-bad-exit=1", "--output=logs/slurm/%x-%j-task%t.out",
                    *MAIN[:4], "--workdir=/shared/runs/llama3", *MAIN[5:]]


def test_slurm_script_one_process_per_gpu_on_one_node():
    ns, overrides = slurm("--per-gpu", "--gpus-per-node=4", "--cpus-per-node=64", "--mem-fraction=0.8",
                          "--xla-flag=--xla_gpu_triton_gemm_any=True", "--coordinator-port=23456")
    lines = slurm_gpu.script_text(ns, overrides).splitlines()
    assert "#SBATCH --ntasks-per-node=4" in lines and "#SBATCH --cpus-per-task=16" in lines
    assert ("export XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_triton_gemm_any=True'"
            in lines)
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in lines
    assert not any("JAX_LOCAL_DEVICE_IDS" in line for line in lines)  # JAX gives process i GPU SLURM_LOCALID
    assert "export JAX_COORDINATOR_PORT=23456" in lines
    assert {"export NCCL_LL128_BUFFSIZE=-2", "export NCCL_LL_BUFFSIZE=-2",
            "export NCCL_PROTO=SIMPLE,LL,LL128"} <= set(lines)


def test_slurm_dry_run_writes_the_script_and_bash_runs_srun_with_the_argv(tmp_path):
    ns, overrides = slurm("--nodes=2", "--venv=", "--log-dir=out/slurm")
    printed = slurm_gpu.render_dry_run(ns, overrides)
    *shell, submit = printed.splitlines()
    assert shlex.split(submit) == ["sbatch", "out/slurm/lit_jax.sbatch"]
    # The printed mkdir + heredoc, run by bash, write exactly the script the launcher writes.
    subprocess.run(["bash", "-c", "\n".join(shell)], cwd=tmp_path, check=True)
    script = tmp_path / "out" / "slurm" / "lit_jax.sbatch"
    assert script.read_text() == slurm_gpu.script_text(ns, overrides)
    # bash runs it with a stand-in srun: the argv srun receives is the one built here.
    fake_program(tmp_path, "srun")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, check=True)
    assert out.stdout.split(b"\0")[:-1] == [a.encode() for a in slurm_gpu.srun_argv(ns, overrides)[1:]]


@pytest.mark.parametrize("argv, flag", [
    (["--nodes=2", "--workdir=/tmp/run"], "--workdir=/tmp/run"), (["--nodes=0"], "--nodes"),
    (["--time=1 day"], "--time"), (["--partition=gpu a"], "--partition"), (["--mem-fraction=1.5"], "--mem-fraction"),
    (["--xla-flag=latency"], "--xla-flag"), (["--per-gpu", "--cpus-per-node=4"], "--cpus-per-node"),
    (["--sbatch-arg=exclusive"], "--sbatch-arg"), (["--log-dir=my logs"], "--log-dir")])
def test_slurm_bad_arguments_name_their_flag(argv, flag, capsys):
    workdir = [] if any(a.startswith("--workdir") for a in argv) else ["--workdir=/shared/r"]
    err = cli_error(slurm_gpu, ["--config=c.py", *workdir, *argv, "--dry-run"], capsys)
    assert flag in err


def test_slurm_one_node_may_use_node_local_storage():
    ns, overrides = slurm("--nodes=1", workdir="/tmp/run")
    assert "--workdir=/tmp/run" in slurm_gpu.script_text(ns, overrides)


# --- one GPU host ----------------------------------------------------------------------------------

def test_local_one_process_over_all_gpus():
    ns, overrides = parse(local_gpu, ["--config=configs/llama3_8b.py", "--workdir=runs/x", *OVERRIDES])
    plan = local_gpu.build_plan(ns, overrides)
    assert plan.commands() == [[
        "env", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        "NCCL_LL128_BUFFSIZE=-2", "NCCL_LL_BUFFSIZE=-2", "NCCL_PROTO=SIMPLE,LL,LL128",
        "python", "-m", "lit_jax.main", "--config=configs/llama3_8b.py", "--workdir=runs/x", *OVERRIDES]]
    assert not plan.parallel


def test_local_one_process_per_gpu():
    ns, overrides = parse(local_gpu, ["--per-gpu", "--gpus=2,3", "--port=23456", "--log-dir=l",
                                      "--config=configs/llama3_8b.py", *OVERRIDES])
    plan = local_gpu.build_plan(ns, overrides)
    assert plan.setup == (["mkdir", "-p", "l"],) and plan.parallel and plan.run_logs == ("l/process-0.log",
                                                                                         "l/process-1.log")
    for i, argv in enumerate(plan.run):
        cut = argv.index("python")
        assert argv[cut - 4:cut] == ["JAX_COORDINATOR_ADDRESS=localhost:23456", "JAX_NUM_PROCESSES=2",
                                     f"JAX_PROCESS_ID={i}", f"JAX_LOCAL_DEVICE_IDS={i + 2}"]
        assert argv[cut:] == ["python", "-m", "lit_jax.main", "--config=configs/llama3_8b.py", *OVERRIDES,
                              "--config.mesh.distributed=True"]
        assert shlex.split(shlex.join(argv)) == argv
    # Without --gpus the count comes from nvidia-smi (main); 8 found -> 8 processes.
    assert len(local_gpu.build_plan(parse(local_gpu, ["--per-gpu", "--config=c.py"])[0], [], 8).run) == 8


@pytest.mark.parametrize("argv, flag", [(["--gpus=x"], "--gpus"), (["--gpus=1,1"], "--gpus"),
                                        (["--gpus=0"], "--gpus"), (["--per-gpu", "--gpus=2", "--port=80"], "--port")])
def test_local_bad_arguments_name_their_flag(argv, flag, capsys):
    assert flag in cli_error(local_gpu, ["--config=c.py", *argv, "--dry-run"], capsys)


def test_local_per_gpu_without_gpus_names_the_flag():
    ns, _ = parse(local_gpu, ["--per-gpu", "--config=c.py"])
    with pytest.raises(common.LaunchError, match="--gpus"):
        local_gpu.build_plan(ns, [], None)


# --- running plans, the environment contract, the CLIs ---------------------------------------------

def test_execute_collects_logs_after_a_failed_run_and_stops_parallel_processes(tmp_path):
    marker = tmp_path / "collected"
    plan = common.Plan(setup=(["true"],), run=(["sh", "-c", "exit 3"],), collect=(["touch", str(marker)],))
    assert common.execute(plan, out=io.StringIO()) == 3 and marker.exists()
    logs = (str(tmp_path / "a.log"), str(tmp_path / "b.log"))
    plan = common.Plan(run=(["sh", "-c", "echo waiting; exec sleep 60"], ["sh", "-c", "echo failing; exit 5"]),
                       parallel=True, run_logs=logs)
    start = time.monotonic()
    assert common.execute(plan, out=io.StringIO()) == 5
    assert time.monotonic() - start < 30  # the sleeper was stopped, not waited for
    assert open(logs[1]).read() == "failing\n"


def test_distributed_init_args_from_the_environment():
    from lit_jax.sharding import distributed_init_args

    assert distributed_init_args({}) == {}
    assert distributed_init_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {"num_processes": 2,
                                                                                        "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed_init_args({"JAX_PROCESS_ID": "one"})


@pytest.mark.parametrize("module, argv", [
    (tpu_pod, ["--name=lit-v4", "--zone=us-central2-b", "--accelerator-type=v4-32", "--create",
               "--config=configs/llama3_8b.py", "--workdir=gs://bucket/runs/llama3"]),
    (slurm_gpu, ["--nodes=2", "--cpus-per-node=96", "--config=configs/llama3_8b.py",
                 "--workdir=/shared/runs/llama3"]),
    (local_gpu, ["--per-gpu", "--gpus=4", "--config=configs/llama3_8b.py", "--workdir=gs://bucket/runs/llama3"]),
])
def test_cli_dry_run(module, argv):
    """`python -m launch.X ... --dry-run` prints what the pure functions build, runs nothing, exits 0."""
    out = subprocess.run([sys.executable, "-m", module.__name__, *argv, *OVERRIDES, "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ns, overrides = parse(module, [*argv, *OVERRIDES])
    expected = (slurm_gpu.render_dry_run(ns, overrides) if module is slurm_gpu
                else common.render(module.build_plan(ns, overrides).commands()))
    assert out.stdout == expected
