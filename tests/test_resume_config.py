"""Resuming with a configuration that changes what the saved parameters mean is refused, naming
each differing field; what may change (steps, cadences, ...) resumes (issue 12, fault 6)."""

import json
import os
import subprocess
import sys

import pytest

from lit_jax.lit.checkpoint import CheckpointMismatchError, check_config_meta, config_meta
from lit_jax.lit.config import LitConfig
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's run
BASE_ARGS = ["--config=configs/tiny.py", "--config.train.checkpoint_every=2", "--config.demo.num_examples=0",
             "--config.train.eval_examples=4"]


def _main(workdir, *overrides):
    return subprocess.run([sys.executable, "-m", "lit_jax.main", *BASE_ARGS, f"--workdir={workdir}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume")
    r = _main(workdir, "--config.train.steps=4")
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir


def test_resume_with_other_lit_config_is_refused(trained):
    r = _main(trained, "--config.data.read_layers=(1,)", "--config.lit.write_mode=add_norm_matched",
              "--config.lit.lora_alpha=4.0", "--config.train.steps=6")
    assert r.returncode != 0
    err = r.stderr
    assert "CheckpointMismatchError" in err
    assert "lit.read_layers: saved [2], current [1]" in err
    assert "lit.write_mode: saved 'replace', current 'add_norm_matched'" in err
    assert "lit.lora.alpha: saved 32.0, current 4.0" in err
    assert "lit.lora.rank" not in err and "model." not in err.split("CheckpointMismatchError")[-1]


def test_resume_with_more_steps_is_allowed(trained):
    # steps, cadences and the lr warmup may change (batch size may not: the data iterator's state refuses it)
    r = _main(trained, "--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every=2",
              "--config.train.warmup_steps=2")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.load(open(trained / "summary.json"))
    assert summary["resumed_from"] == 4 and summary["steps"] == 6


def _cfg(**kw):
    return ModelConfig(**{**dict(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64,
                                 intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16), **kw})


def test_config_meta_comparison():
    lcfg = LitConfig(read_layers=(1,), lora=LoraConfig(rank=4))
    saved = config_meta(_cfg(), lcfg, data={"prompt_style": "latentqa", "placeholder": "<empty_output>"})
    saved = json.loads(json.dumps(saved))  # as the checkpoint stores it
    # run-time options, special token ids and an undescribed data section may differ
    check_config_meta({"config": saved}, config_meta(_cfg(dtype="bfloat16", eos_token_ids=(2, 7), remat="full"),
                                                     lcfg), "ckpt")
    with pytest.raises(CheckpointMismatchError) as e:
        check_config_meta({"config": saved}, config_meta(
            _cfg(rope_theta=500000.0, qk_norm=True), LitConfig(read_layers=(1,), lora=None, projection="linear",
                                                              ablate="zeros"),
            data={"prompt_style": "oracle", "placeholder": "<empty_output>"}), "ckpt")
    msg = str(e.value)
    for field in ("model.rope_theta: saved 10000.0, current 500000.0", "model.qk_norm: saved False, current True",
                  "lit.lora: saved {'rank': 4", "current None", "lit.projection: saved 'identity', current 'linear'",
                  "lit.ablate: saved 'none', current 'zeros'", "data.prompt_style: saved 'latentqa', current 'oracle'"):
        assert field in msg
    assert "data.placeholder" not in msg and "model.dtype" not in msg and "model.eos_token_ids" not in msg
    # a checkpoint from before the structured meta is compared by its LitConfig repr
    check_config_meta({"architecture": "LlamaForCausalLM", "lit": repr(lcfg)}, config_meta(_cfg(), lcfg), "old")
    with pytest.raises(CheckpointMismatchError, match="lit: saved"):
        check_config_meta({"architecture": "LlamaForCausalLM", "lit": repr(lcfg)},
                          config_meta(_cfg(), LitConfig(read_layers=(2,), lora=LoraConfig(rank=4))), "old")
