"""Export to HF format and back: transformers loads our export; our loader reproduces our arrays."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_jax.hf import export_hf, load_params
from lit_jax.hf import export as export_mod
from lit_jax.models import llama


def _assert_trees_equal(a, b):
    ja, jb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in ja] == [p for p, _ in jb]
    for (path, x), (_, y) in zip(ja, jb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("arch", ["llama_bias", "smollm2", "qwen2", "qwen3", "llama3", "mistral"])
def test_hf_dir_to_params_to_hf_dir_round_trip(tiny_checkpoint, tmp_path, arch):
    src, _ = tiny_checkpoint(arch)
    cfg, params = load_params(src)
    out = export_hf(params, cfg, str(tmp_path / "export"))
    cfg2, params2 = load_params(out)
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)


@pytest.mark.parametrize("max_shard_bytes", [None, 60_000], ids=["single", "sharded"])
def test_transformers_loads_our_export(tmp_path, max_shard_bytes):
    from lit_jax.models.config import ModelConfig

    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=96, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4, qk_norm=True,
                      eos_token_ids=(2,))
    params = llama.init_params(jax.random.key(0), cfg, std=0.2)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    out = export_hf(params, cfg, str(tmp_path / "export"), **kw)
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == (max_shard_bytes is not None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 96, size=(2, 7))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours = llama.forward(params, jnp.asarray(tokens), cfg).logits
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    from safetensors import safe_open

    first = [f for f in files if f.endswith(".safetensors")][0]
    with safe_open(os.path.join(out, first), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}


def test_bf16_export_round_trip(tiny_checkpoint, tmp_path):
    cfg, params = load_params(tiny_checkpoint("llama")[0], dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    out = export_hf(params, cfg, str(tmp_path / "bf16"))
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    _assert_trees_equal(params, load_params(out, dtype="bfloat16")[1])


def test_export_refuses_to_overwrite_and_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    cfg, params = load_params(tiny_checkpoint("llama")[0])
    target = str(tmp_path / "export")
    export_hf(params, cfg, target)
    before = sorted(os.listdir(target))
    with pytest.raises(FileExistsError):
        export_hf(params, cfg, target)

    calls = {"n": 0}
    real_save = export_mod.save_file

    def crash_on_second_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(*a, **k)

    monkeypatch.setattr(export_mod, "save_file", crash_on_second_shard)
    other = jax.tree.map(lambda x: x * 2, params)
    with pytest.raises(OSError, match="simulated"):
        export_hf(other, cfg, target, overwrite=True, max_shard_bytes=20_000)
    calls["n"] = 0
    with pytest.raises(OSError, match="simulated"):
        export_hf(other, cfg, str(tmp_path / "fresh"), max_shard_bytes=20_000)
    # The earlier export is intact, the new one never appeared, and no temp dirs are left.
    assert sorted(os.listdir(target)) == before
    _assert_trees_equal(load_params(target)[1], params)
    assert sorted(os.listdir(tmp_path)) == ["export"]
