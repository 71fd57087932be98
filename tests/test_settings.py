"""One source of defaults: the command line's config and the Python API agree; unread fields are errors."""

import os
import sys

import pytest

from lit_jax.lit.config import LitConfig
from lit_jax.lit.train import TrainConfig
from lit_jax.models.config import ModelConfig
from lit_jax.settings import (DemoConfig, ExportConfig, MeshConfig, from_section, lit_from_section, model_run_options,
                              train_from_config)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.common import lit_config  # noqa: E402


def test_command_line_defaults_are_the_python_defaults():
    c = lit_config()
    assert train_from_config(c) == TrainConfig()
    assert lit_from_section(c.lit, c.data.read_layers) == LitConfig(read_layers=tuple(c.data.read_layers))
    assert from_section(MeshConfig, c.mesh, "mesh") == MeshConfig()
    assert from_section(DemoConfig, c.demo, "demo") == DemoConfig()
    assert from_section(ExportConfig, c.export, "export") == ExportConfig()
    run = model_run_options(c.model)
    reference = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, intermediate_size=8,
                            num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8)
    assert run == {k: getattr(reference, k) for k in run} and set(run) == {"dtype", "scan_layers", "remat",
                                                                          "attention"}


@pytest.mark.parametrize("section,convert", [
    ("train", lambda c: train_from_config(c)),
    ("lit", lambda c: lit_from_section(c.lit, (15,))),
    ("mesh", lambda c: from_section(MeshConfig, c.mesh, "mesh")),
    ("demo", lambda c: from_section(DemoConfig, c.demo, "demo")),
    ("model", lambda c: model_run_options(c.model)),
])
def test_a_field_nothing_reads_is_an_error(section, convert):
    c = lit_config()
    c[section].unlock()
    c[section].stray_setting = 1
    with pytest.raises(ValueError, match=rf"config\.{section}\.stray_setting is not a setting"):
        convert(c)


def test_train_seed_belongs_to_the_run():
    c = lit_config()
    c.train.unlock()
    c.train.seed = 3
    with pytest.raises(ValueError, match="config.train.seed"):
        train_from_config(c)
    c = lit_config()
    c.seed = 7
    assert train_from_config(c).seed == 7
