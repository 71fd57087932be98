"""Every config.json field that changes the computation is implemented or refused by name (issue 12, fault 4)."""

import pytest

from lit_jax.models.config import CHECKED_HF_FIELDS, RopeScaling, UnsupportedModelError, from_hf_dict, to_hf_dict

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0)
QWEN2 = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
QWEN3 = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
MISTRAL = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16}


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "relu", "gelu_new", "silu_and_mul"])
@pytest.mark.parametrize("base", [LLAMA, MISTRAL, QWEN2, QWEN3], ids=lambda d: d["model_type"])
def test_hidden_act_other_than_silu_is_refused(base, act):
    with pytest.raises(UnsupportedModelError, match=rf"hidden_act='{act}'"):
        from_hf_dict({**base, "hidden_act": act})


@pytest.mark.parametrize("act", ["silu", "swish", None])
def test_silu_is_accepted(act):
    d = dict(LLAMA)
    if act is None:
        del d["hidden_act"]
    else:
        d["hidden_act"] = act
    cfg = from_hf_dict(d)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (64, 2, 2, 16)


@pytest.mark.parametrize("base, changes, name", [
    (LLAMA, dict(hidden_activation="gelu_pytorch_tanh"), "hidden_activation"),
    (LLAMA, dict(mlp_bias=True), "mlp_bias"),
    (LLAMA, dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (LLAMA, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
     "partial_rotary_factor"),
    (LLAMA, dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     "rope scaling type 'yarn'"),
    (LLAMA, dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic'"),
    (LLAMA, dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
     "rope scaling type 'longrope'"),
    (LLAMA, dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope scaling type 'yarn'"),
    (LLAMA, dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "per-layer-type rope_parameters"),
    (LLAMA, dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (LLAMA, dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (LLAMA, dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (LLAMA, dict(layer_types=["full_attention", "sliding_attention"], sliding_window=8), "layer_types"),
    (QWEN2, dict(use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (QWEN3, dict(use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (QWEN3, dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (MISTRAL, dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
])
def test_unimplemented_fields_are_refused_by_name(base, changes, name):
    with pytest.raises(UnsupportedModelError, match=name) as e:
        from_hf_dict({**base, **changes}, source="ckpt/config.json")
    assert "ckpt/config.json" in str(e.value)


@pytest.mark.parametrize("base, changes", [
    (LLAMA, dict(pretraining_tp=2)),  # transformers slices the same matmuls: identical math
    (LLAMA, dict(attention_dropout=0.1)),  # inactive at eval
    (LLAMA, dict(partial_rotary_factor=1.0)),
    (LLAMA, dict(attn_logit_softcapping=None, final_logit_softcapping=None, mlp_bias=False)),
    (LLAMA, dict(layer_types=["full_attention", "full_attention"])),
    (QWEN2, dict(use_sliding_window=False, sliding_window=32768, max_window_layers=28,
                 layer_types=["full_attention"] * 2)),
    (MISTRAL, dict(layer_types=["sliding_attention"] * 2)),
    (LLAMA, dict(rope_scaling={"rope_type": "default"})),
])
def test_neutral_values_are_accepted(base, changes):
    from_hf_dict({**base, **changes})


def test_supported_rope_scaling_is_kept():
    cfg = from_hf_dict({**LLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    d = {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert from_hf_dict(d).rope_scaling.kind == "llama3"


@pytest.mark.parametrize("base", [LLAMA, MISTRAL, QWEN2, QWEN3], ids=lambda d: d["model_type"])
def test_exported_config_round_trips_through_the_checks(base):
    cfg = from_hf_dict(base)
    assert from_hf_dict(to_hf_dict(cfg)) == cfg


def test_checked_fields_are_listed():
    named = " ".join(f for f, _ in CHECKED_HF_FIELDS)
    for f in ("hidden_act", "hidden_activation", "mlp_bias", "partial_rotary_factor", "rope_scaling", "layer_types",
              "use_sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "pretraining_tp",
              "attention_dropout", "quantization_config", "head_dim", "tie_word_embeddings"):
        assert f in named, f
