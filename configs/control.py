"""Steer a target with a trained LIT decoder (`control` task, lit_jax/lit/control.py).

    python -m lit_jax.main --config=configs/control.py --config.decoder=workdirs/smollm2_demo \
        --config.control.file=../shared/data/latentqa/controls/golden_gate.json --config.control.method=vectors

decoder: a `lit` run's work dir (required); decoder_step: its checkpoint step (-1: latest);
target: other weights for the target ("" = the run's model.source). Every field of `control`
is documented in lit_jax.lit.control.ControlConfig (its defaults are the only definition).
The result goes to <workdir>/<control file stem>_<method> (steering.safetensors + steering.json);
chat with it: --config=configs/smollm2_chat.py --config.chat.steering=DIR.
"""

from ml_collections import ConfigDict

from lit_jax.lit.control import ControlConfig
from lit_jax.settings import section


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.task = "control"
    c.seed = 0
    c.decoder = ""
    c.decoder_step = -1
    c.target = ""
    c.control = section(ControlConfig)
    return c
