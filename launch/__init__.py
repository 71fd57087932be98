"""Launchers: the same `python -m lit_jax.main` on a TPU pod slice, a SLURM GPU cluster or one GPU host.

Run from the repository root (`python -m launch.tpu_pod ...`, `launch.slurm_gpu`, `launch.local_gpu`);
like `configs/`, this package is not installed by `pip install -e .`. Standard library only, so the
launchers work on a login node or laptop without JAX. Each builds its commands in pure functions
(argument namespace -> argv lists / script text) and has `--dry-run`, which prints them and runs nothing.
"""
