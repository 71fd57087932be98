"""Impossible settings are refused before any work, each error naming its flag (issue 17, part 2)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from lit_jax.config_checks import (ConfigError, check_lit_against, check_lit_settings, check_read_settings,
                                   resolve_mesh_shape)
from lit_jax.lit.job import load_model, model_header, run_lit
from lit_jax.models.config import ModelConfig, to_hf_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import read as read_config  # noqa: E402
from configs import tiny  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's run
TINY_LAYERS = tiny.get_config().model.random.num_layers  # 4


def _tiny(**overrides):
    """configs/tiny.py with `section.field` overrides."""
    c = tiny.get_config()
    for name, value in overrides.items():
        section, field = name.split(".")
        c[section][field] = value
    return c


def _refused(flag, check, *args, **kwargs):
    with pytest.raises(ConfigError, match=re.escape(f"--config.{flag}=")) as e:
        check(*args, **kwargs)
    return str(e.value)


# Values impossible whatever the model and devices: refused by check_lit_settings.
ALONE = [
    ("train.steps", -5), ("train.steps", 0),
    ("train.lr", 0.0), ("train.lr", -1e-3), ("train.lr", math.nan), ("train.lr", math.inf),
    ("train.warmup_steps", -1),
    ("train.weight_decay", -0.1), ("train.clip_norm", 0.0), ("train.accum_steps", 0), ("train.log_every", 0),
    ("train.eval_every", -1), ("train.eval_examples", -1), ("train.checkpoint_every", -1),
    ("train.keep_checkpoints", 0), ("train.pack_multiple", 0), ("train.pack_levels", 0),
    ("train.presize_batches", -1),
    ("lit.write_layer", -1), ("lit.write_mode", "add"), ("lit.projection", "conv"), ("lit.ablate", "ones"),
    ("lit.mlp_hidden", -1), ("lit.lora_rank", 0), ("lit.lora_alpha", 0.0), ("lit.lora_alpha", math.nan),
    ("lit.lora_targets", ("q", "attn")),
    ("data.read_layers", (-1,)), ("data.read_layers", ()), ("data.batch_size", 0),
    ("data.heldout_fraction", 1.0), ("data.heldout_fraction", -0.1), ("data.max_records_per_source", -1),
    ("data.num_buckets", 0), ("data.bucket_multiple", 0), ("data.bucket_read_weight", 0.0),
    ("data.max_read_tokens", 0), ("data.max_decoder_tokens", 0), ("data.classification_tokens", 0),
    ("data.prompt_style", "chat"), ("data.on_bad_record", "ignore"), ("data.storage", "disk"),
    ("demo.num_examples", -1), ("demo.max_new_tokens", 0),
    ("mesh.shape", (-1, -1, 1)), ("mesh.shape", (1, 1)), ("mesh.shape", (0, 1, 1)),
]


@pytest.mark.parametrize("flag,value", ALONE, ids=[f"{f}={v}" for f, v in ALONE])
def test_an_impossible_value_is_refused_naming_its_flag(flag, value):
    message = _refused(flag, check_lit_settings, _tiny(**{flag: value}))
    assert "must" in message or "allowed:" in message  # and says what is allowed


# Values impossible for the tiny model (4 blocks) or the devices: refused by check_lit_against.
AGAINST = [
    ("data.read_layers", (99,), 1, "allowed: 0..3 (the model has 4 blocks)"),
    ("data.read_layers", (2, 4), 1, "layer(s) [4] out of range"),
    ("lit.write_layer", 50, 1, "allowed: 0..3"),
    ("lit.write_layer", 4, 1, "allowed: 0..3"),
    ("evaluate.probe_layers", (1, 7), 1, "layer(s) [7] out of range"),
    ("mesh.shape", (2, 1, 1), 1, "uses 2 devices"),
    ("mesh.shape", (3, -1, 1), 8, "must divide the 8 devices"),
    ("data.batch_size", 6, 8, "data-parallel mesh size 8"),  # mesh (-1, 1, 1) over 8 devices
]


@pytest.mark.parametrize("flag,value,devices,says", AGAINST, ids=[f"{f}={v}" for f, v, _, _ in AGAINST])
def test_a_setting_impossible_for_the_model_or_devices_is_refused(flag, value, devices, says):
    config = _tiny(**{flag: value})
    check_lit_settings(config)  # possible on its own
    message = _refused(flag, check_lit_against, config, num_layers=TINY_LAYERS, device_count=devices)
    assert says in message


def test_the_global_batch_counts_micro_batches_and_processes():
    message = _refused("data.batch_size", check_lit_against, _tiny(**{"train.accum_steps": 3}),
                       num_layers=TINY_LAYERS, device_count=1)
    assert "train.accum_steps 3" in message and "allowed: a multiple of 3" in message
    # 2 processes feeding 4 devices in all: 2 rows per process fill them.
    assert check_lit_against(_tiny(**{"data.batch_size": 2}), num_layers=TINY_LAYERS, device_count=4,
                             process_count=2) == (4, 1, 1)


def test_valid_configs_pass():
    check_lit_settings(_tiny())
    assert check_lit_against(_tiny(), num_layers=TINY_LAYERS, device_count=1) == (1, 1, 1)
    edges = _tiny(**{"train.warmup_steps": 45, "train.eval_every": 0, "train.checkpoint_every": 0,
                     "data.heldout_fraction": 0.0, "data.read_layers": (0, 3), "lit.write_layer": 3,
                     "demo.num_examples": 0, "mesh.shape": (2, 1, -1)})
    check_lit_settings(edges)
    assert check_lit_against(edges, num_layers=TINY_LAYERS, device_count=4) == (2, 1, 2)
    # A full fine-tune has no LoRA: its fields are not read, so not checked.
    check_lit_settings(_tiny(**{"lit.full_finetune": True, "lit.lora_rank": 0}))


def test_mesh_shape_resolves_as_make_mesh_does():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape([1, 8, 1], 8) == (1, 8, 1)


@pytest.mark.parametrize("flag,value", [("read.batch_size", 0), ("read.max_new_tokens", 0),
                                        ("read.temperature", -1.0), ("read.top_k", -1), ("read.layer", -2),
                                        ("read.each_token_last", -1), ("read.read_from_turn", -1)])
def test_the_read_task_refuses_impossible_sizes(flag, value):
    c = read_config.get_config()
    c.read[flag.split(".")[1]] = value
    _refused(flag, check_read_settings, c.read)


def test_model_depth_comes_from_config_json_without_weights(tmp_path):
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=8,
                      num_layers=3, num_heads=1, num_kv_heads=1, head_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(cfg)))  # no weights in the directory
    model = _tiny(**{"model.source": str(tmp_path)}).model
    assert model_header(model) == (3, None)
    model.source = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_header(model)


def test_gguf_header_is_parsed_once_and_shared_with_the_loader():
    from configs import smollm2_demo

    model = smollm2_demo.get_config().model
    num_layers, reader = model_header(model)
    assert num_layers == 30 and reader is not None
    cfg, params, tokenizer = load_model(model, 0, reader)
    assert cfg.num_layers == 30 and params["layers"]["qkv"].shape[0] == 30 and len(tokenizer) == cfg.vocab_size


@pytest.mark.parametrize("overrides,flag", [
    ({"lit.write_layer": 50}, "lit.write_layer"),
    ({"data.batch_size": 4}, "data.batch_size"),  # 4 rows over the 8 test devices (conftest)
])
def test_run_lit_refuses_before_the_work_dir_is_written(tmp_path, overrides, flag):
    workdir = tmp_path / "run"
    _refused(flag, run_lit, _tiny(**overrides), str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("override,flag", [("--config.train.steps=-5", "--config.train.steps=-5"),
                                           ("--config.data.read_layers=(99,)", "--config.data.read_layers=(99,)")])
def test_command_line_refuses_before_preparing_data(tmp_path, override, flag):
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        override], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode != 0
    assert "ConfigError" in r.stderr and flag in r.stderr, r.stderr[-2000:]
    assert "data:" not in r.stdout and not workdir.exists()  # no data prepared, nothing written
