"""Sections shared by every LIT config; each configs/*.py starts from `lit_config()` and changes what differs.

Every default comes from one definition (lit_jax/settings.py builds each section from its
settings dataclass: TrainConfig, LitConfig + LoraConfig, ModelConfig's run options,
MeshConfig, DemoConfig, ExportConfig; data from default_data_config()). The job converts
each section back strictly, so a field nothing reads is an error.
"""

from ml_collections import ConfigDict

from lit_jax.data import default_data_config
from lit_jax.eval.harness import EvalSettings
from lit_jax.plan import PlanSettings
from lit_jax.settings import DemoConfig, ExportConfig, MeshConfig, lit_section, model_section, section, train_section


def lit_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "lit"
    c.seed = 0
    c.model = model_section()  # source: an HF directory, a .gguf file, "smollm2", or "random" (tests)
    c.mesh = section(MeshConfig)  # shape (data, fsdp, tensor)
    c.data = default_data_config()
    c.lit = lit_section()  # write_layer, write_mode, projection, ..., lora_rank/alpha/targets (read layers: data)
    c.train = train_section()
    c.demo = section(DemoConfig)
    c.export = section(ExportConfig)
    c.plan = section(PlanSettings)  # the `plan` task: per-device memory and collectives, compiled abstractly
    c.evaluate = section(EvalSettings, tasks=())  # the evaluation after training (lit_jax/eval); () = none
    return c
