"""Loading GGUF files (llama.cpp format): config from metadata, tensors dequantized with `gguf`.

llama.cpp stores Llama q/k projections with rows permuted for its interleaved rotary
layout; they are permuted back to HF's half-split layout here.
"""

from __future__ import annotations

import os
import re
from typing import Any

import gguf
import numpy as np

from lit_jax.hf.convert import CheckpointError, params_from_hf
from lit_jax.models.config import ModelConfig, RopeScaling, UnsupportedModelError

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def config_from_gguf(reader: gguf.GGUFReader, path: str, **run_options: Any) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHS)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            f"{path}: GGUF with precomputed rope_freqs (Llama-3.1 rope scaling) is not supported; "
            "load the HF safetensors checkpoint instead"
        )
    k = lambda name, default=None: field(reader, f"{arch}.{name}", default)  # noqa: E731
    try:
        hidden, heads = int(k("embedding_length")), int(k("attention.head_count"))
        scaling = None
        if k("rope.scaling.type") == "linear":
            scaling = RopeScaling(kind="linear", factor=float(k("rope.scaling.factor")))
        vocab = k("vocab_size") or len(field(reader, "tokenizer.ggml.tokens"))
        eos = field(reader, "tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=_ARCHS[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(k("feed_forward_length")),
            num_layers=int(k("block_count")),
            num_heads=heads,
            num_kv_heads=int(k("attention.head_count_kv", heads)),
            head_dim=int(k("attention.key_length", hidden // heads)),
            rope_theta=float(k("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            max_position_embeddings=int(k("context_length", 8192)),
            bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
            **run_options,
        )
    except TypeError as e:  # int(None): a required metadata key is missing
        raise CheckpointError(f"{path}: GGUF metadata is missing a required {arch}.* key ({e})") from None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved -> half-split rotary pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> gguf.GGUFReader:
    """Parses a GGUF file's header (~3 s for SmolLM2: open once, share the reader)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def load_gguf(path: str, reader: gguf.GGUFReader | None = None, **run_options: Any):
    """Returns (cfg, numpy params) from a GGUF file."""
    reader = reader or open_gguf(path)
    cfg = config_from_gguf(reader, path, **run_options)
    tensors = {hf_name(t.name): t for t in reader.tensors if hf_name(t.name)}
    permute = cfg.architecture == "LlamaForCausalLM"

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: missing tensor for {name!r}")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if not w.flags.owndata:  # an f32 tensor is a view of the file's memory map: copy it, or the map
            w = w.copy()         # (the whole file) stays resident as long as the weights live
        if permute and name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.num_kv_heads)
        return w

    return cfg, params_from_hf(get, cfg, source=path)
