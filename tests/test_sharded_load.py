"""Loading a safetensors checkpoint straight into shards (issue 15, item 1), on 8 fake CPU devices."""

import os

import jax
import numpy as np
import pytest
import torch

from lit_jax import sharding as shd
from lit_jax.hf import sharded_load
from lit_jax.hf.convert import CheckpointError
from lit_jax.hf.safetensors_in import load_safetensors_dir
from lit_jax.models import llama
from tests import tiny_models


def _assert_same(whole: dict, sharded: dict) -> None:
    flat_w = dict(jax.tree_util.tree_leaves_with_path(whole))
    flat_s = dict(jax.tree_util.tree_leaves_with_path(sharded))
    assert flat_w.keys() == flat_s.keys()
    for k, w in flat_w.items():
        s = flat_s[k]
        assert s.dtype == w.dtype, k
        np.testing.assert_array_equal(np.asarray(s), w, err_msg=jax.tree_util.keystr(k))
        for shard in s.addressable_shards:  # each device holds exactly its block of the whole
            np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index], err_msg=jax.tree_util.keystr(k))


@pytest.mark.parametrize("arch,shape", [
    ("llama", (1, 2, 4)), ("llama", (2, 2, 2)), ("llama3", (1, 8, 1)), ("llama_bias", (1, 4, 2)),
    ("smollm2", (2, 2, 2)), ("qwen2", (1, 2, 4)), ("qwen3", (2, 1, 4)), ("mistral", (1, 1, 8)),
])
def test_sharded_load_equals_whole_load(tiny_checkpoint, arch, shape):
    path, _ = tiny_checkpoint(arch)
    mesh = shd.make_mesh(shape)
    cfg, whole = load_safetensors_dir(path)
    cfg2, sharded = sharded_load.load_safetensors_sharded(path, mesh)
    assert cfg2 == cfg
    _assert_same(whole, sharded)
    expected = shd.tree_shardings(llama.param_axes(cfg), whole, mesh, units=llama.param_units(cfg))
    got = jax.tree.map(lambda x: x.sharding, sharded)
    assert jax.tree.leaves(got) == jax.tree.leaves(expected)
    assert sharded["layers"]["qkv"].sharding.spec != jax.sharding.PartitionSpec()  # really split


def test_sharded_index_bf16_and_each_block_read_once(tmp_path, monkeypatch):
    """A checkpoint split over several files (model.safetensors.index.json), stored in bf16 and
    loaded as bf16; over (1, 8, 1) every element of every tensor is read exactly once."""
    _, model = tiny_models.build("llama", str(tmp_path / "f32"))
    path = str(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    cfg, whole = load_safetensors_dir(path, dtype="bfloat16")

    read_elements = []
    original = sharded_load.read_block

    def counting(read, cfg_, key, bounds):
        out = original(read, cfg_, key, bounds)
        read_elements.append(out.size)
        return out

    monkeypatch.setattr(sharded_load, "read_block", counting)
    mesh = shd.make_mesh((1, 8, 1))
    _, sharded = sharded_load.load_safetensors_sharded(path, mesh, dtype="bfloat16")
    _assert_same(whole, sharded)
    assert sharded["embed"].dtype == jax.numpy.bfloat16
    # embed is [V, D] with D over fsdp: 8 blocks of 1/8 each, one read each (not 8 whole copies)
    assert sum(read_elements) == llama.num_params(whole)


def test_sharded_load_refuses_wrong_shapes_before_reading(tiny_checkpoint, tmp_path):
    from lit_jax.models.config import load_hf_config

    path, _ = tiny_checkpoint("llama")
    cfg = load_hf_config(path)
    wrong = cfg.replace(intermediate_size=cfg.intermediate_size * 2)
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*has shape \(96, 64\), expected \(192, 64\)"):
        sharded_load.load_safetensors_sharded(path, shd.make_mesh((1, 8, 1)), wrong)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sharded_load.load_safetensors_sharded(str(tmp_path / "nope"), shd.make_mesh((1, 8, 1)))
