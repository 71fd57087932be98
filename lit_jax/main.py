"""Command line: python -m lit_jax.main --config=configs/<name>.py[:arg] [--workdir=DIR] [--config.a.b=value ...]

The config is a Python file (`get_config(arg)` returning an ml_collections ConfigDict),
locked, so an override of a key that does not exist is an error, not a silent no-op.
`config.task` picks the job.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/smollm2_demo.py", "Config file (configs/*.py), optionally with :arg.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and the summary; a run resumes from its latest "
    "checkpoint. Default: workdirs/<config name>."
)


def run_lit(config, workdir: str) -> dict:
    """Train a LIT decoder, evaluate it on held-out labels, answer questions (lit/job.py)."""
    from lit_jax.lit.job import run_lit as job

    return job(config, workdir)


def run_chat(config, workdir: str) -> list[str]:
    """Loads a model and answers the configured questions (the foundation's smoke job); with
    `chat.steering` (a directory the `control` task saved), the steered model answers."""
    from lit_jax.generate import SamplingConfig, chat
    from lit_jax.hf import load_pretrained

    m = config.model
    pre = load_pretrained(m.source, dtype=m.dtype, scan_layers=m.scan_layers)
    steering = None
    if config.chat.get("steering"):
        from lit_jax.lit.control import load_steering

        steering = load_steering(config.chat.steering, pre.cfg).steering
    sampling = SamplingConfig(config.chat.max_new_tokens, config.chat.temperature, config.chat.top_k)
    answers = chat(pre.params, pre.cfg, pre.tokenizer, list(config.chat.questions), sampling=sampling,
                   seed=config.seed, steering=steering)
    for q, a in zip(config.chat.questions, answers):
        print(f"Q: {q}\nA: {a}\n", flush=True)
    return answers


def run_read(config, workdir: str) -> list[dict]:
    """Ask a trained decoder about reads from a JSONL file or flags (lit/read_task.py)."""
    from lit_jax.lit.read_task import run_read as task

    return task(config, workdir)


def run_control(config, workdir: str) -> dict:
    """Steer the target through a trained decoder: vectors or a target LoRA (lit/control.py)."""
    from lit_jax.lit.control import run_control as job

    return job(config, workdir)


def run_export(config, workdir: str) -> dict:
    """Write a trained decoder as an HF PEFT adapter and/or merged HF model (lit/export.py)."""
    from lit_jax.lit.export import run_export as task

    return task(config, workdir)


def run_evaluate(config, workdir: str) -> dict:
    """Evaluate a trained decoder with its controls: tables and plots (lit_jax/eval/harness.py)."""
    from lit_jax.eval.harness import run_evaluate as task

    return task(config, workdir)


def run_serve(config, workdir: str) -> None:
    """Serve a local web page and JSON API over a trained decoder (lit_jax/serve/app.py)."""
    from lit_jax.serve.app import run_serve as task

    task(config, workdir)


def run_plan(config, workdir: str) -> dict:
    """Per-device memory and collectives of the run's train step and reading, compiled abstractly (lit_jax/plan.py)."""
    from lit_jax.plan import run_plan as task

    return task(config, workdir)


TASKS = {"lit": run_lit, "chat": run_chat, "read": run_read, "control": run_control, "export": run_export,
         "evaluate": run_evaluate, "serve": run_serve, "plan": run_plan}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax, ...) would bury the progress bar
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config.task not in TASKS:
        raise app.UsageError(f"config.task={config.task!r}; expected one of {sorted(TASKS)}")
    config_file = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    workdir = _WORKDIR.value or os.path.join("workdirs", os.path.splitext(os.path.basename(config_file))[0])
    logging.info("config:\n%s", config)
    TASKS[config.task](config, workdir)


if __name__ == "__main__":
    from lit_jax.cpu_tuning import reexec_with_hugepages

    reexec_with_hugepages()  # before JAX starts: huge pages for XLA:CPU's per-step buffers (CPU runs only)
    app.run(main)
