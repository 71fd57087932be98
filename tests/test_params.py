"""Parameter trees: logical axis names cover every array, shapes agree with loaded checkpoints."""

import jax
import pytest

from lit_jax.hf import load_params
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig, UnsupportedModelError
from lit_jax.models.lora import LoraConfig, init_lora, lora_axes


@pytest.mark.parametrize("arch", ["llama_bias", "qwen2", "qwen3", "smollm2"])
def test_axes_and_shapes_match_loaded_params(tiny_checkpoint, arch):
    cfg, params = load_params(tiny_checkpoint(arch)[0])
    axes = llama.param_axes(cfg)
    shapes = llama.param_shapes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for arr, ax, sds in zip(jax.tree.leaves(params), flat_axes, jax.tree.leaves(shapes)):
        assert arr.shape == sds.shape and len(ax) == arr.ndim
    init = llama.init_params(jax.random.key(0), cfg)
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)


def test_lora_axes_cover_lora_params():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=24,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    lcfg = LoraConfig(rank=2)
    lora = init_lora(jax.random.key(0), cfg, lcfg)
    axes = lora_axes(lcfg)
    for arr, ax in zip(jax.tree.leaves(lora), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(ax) == arr.ndim


def test_bad_run_options_raise():
    base = dict(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=24,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(**base, remat="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(**base, dtype="float16")
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        ModelConfig(**{**base, "architecture": "FalconForCausalLM"})
