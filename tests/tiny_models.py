"""Tiny random checkpoints of each supported architecture, built with transformers + PyTorch.

All weights (norms and biases included) are randomised so that a mistake in any tensor's
layout shows up in the logits.
"""

import torch
import transformers

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

ARCHS = {
    # name: (config class, model class, extra config)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "smollm2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=12)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}


def build(name: str, out_dir: str, seed: int = 0):
    config_cls, model_cls, extra = ARCHS[name]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.08) + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir, model
