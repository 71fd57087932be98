"""Shared fixtures: tiny random HF checkpoints per architecture, and the real SmolLM2 model.

8 fake CPU devices are configured before JAX starts, for the sharding tests.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """After each test module, JAX's compiled programs go: every XLA:CPU executable holds its own
    code mappings, and one process compiling the whole suite's shapes ran out of them (a segfault
    inside the compiler, late in the run)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: name -> (hf_dir, torch model) for a tiny random checkpoint (built once per session)."""
    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = tiny_models.build(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """Our SmolLM2-135M-Instruct (f32): Pretrained(cfg, params, tokenizer)."""
    from lit_jax.hf import load_pretrained

    return load_pretrained("smollm2")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own PyTorch SmolLM2, loaded from the same GGUF by transformers' loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_jax.hf import smollm2_gguf_path

    path = smollm2_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)
