"""Evaluate a trained decoder (task `evaluate`): judge-free tasks, each with its controls.

    python -m lit_jax.main --config=configs/evaluate.py --config.decoder=workdirs/smollm2_demo
    python -m lit_jax.main --config=configs/evaluate.py --config.decoder=workdirs/smollm2_demo \
        --config.evaluate.tasks='("hidden_system", "classification")' --config.evaluate.controls='("zeros",)'

Writes results.json, results.md and PNG plots into --config.out_dir (default <workdir>/eval) and
prints the table. Settings: lit_jax/eval/harness.py EvalSettings; --config.mesh.shape lays the decoder over
several devices (default one).
"""

from ml_collections import ConfigDict

from lit_jax.eval.harness import EvalSettings
from lit_jax.settings import MeshConfig, section


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.task = "evaluate"
    c.seed = 0
    c.decoder = ""  # a `lit` run's work dir, or a decoder export
    c.decoder_step = -1  # the checkpoint step to load; -1: the latest
    c.target = ""  # other weights for the target (must be the model the decoder was trained on); "": as trained
    c.out_dir = ""  # "": <workdir>/eval
    c.evaluate = section(EvalSettings)
    # (data, fsdp, tensor) over the first product-many devices; one -1 takes all of them. A model too big for one
    # device: e.g. (1, 1, -1) splits every layer across the devices (tensor parallel), (1, -1, 1) shards the weights.
    c.mesh = section(MeshConfig)
    c.mesh.shape = (1, 1, 1)
    return c
