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
from lit_jax.models.config import ModelConfig, UnsupportedModelError, from_hf_dict

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


# GGUF metadata keys ({arch}.<key>) read by `hf_config_from_gguf`, and what becomes of each
# (issue 12, fault 5). Each maps to the config.json field the safetensors loader reads, and the
# result goes through the same `from_hf_dict` checks: both loaders accept and refuse the same
# models. Keys that change the computation with no HF counterpart here are refused by name.
CHECKED_GGUF_KEYS = (
    ("general.architecture", "architectures (llama, qwen2, qwen3; others refused)"),
    ("vocab_size / tokenizer.ggml.tokens", "vocab_size"),
    ("embedding_length, feed_forward_length, block_count", "hidden_size, intermediate_size, num_hidden_layers"),
    ("attention.head_count, attention.head_count_kv", "num_attention_heads, num_key_value_heads "
     "(per-layer arrays accepted only when uniform)"),
    ("attention.key_length / attention.value_length", "head_dim (differing key/value lengths refused)"),
    ("rope.dimension_count", "partial_rotary_factor = dimension_count / head_dim (refused unless 1)"),
    ("rope.freq_base", "rope_theta"),
    ("rope.scaling.type, .factor, .original_context_length", "rope_scaling {rope_type, factor, "
     "original_max_position_embeddings}: linear accepted, yarn and others refused as in config.json"),
    ("rope.scaling.attn_factor, rope.scaling.yarn_*", "refused unless neutral (only meaningful with yarn)"),
    ("rope_freqs.weight tensor", "refused (precomputed Llama-3.1 rope factors)"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("attention.sliding_window", "llama: sliding_window (loaded as Mistral); qwen2/3: use_sliding_window "
     "(refused as in config.json)"),
    ("attn_logit_softcapping, final_logit_softcapping", "same names (refused)"),
    ("expert_count", "refused when > 0 (mixture of experts, e.g. Mixtral GGUFs under 'llama')"),
    ("attention.scale, embedding_scale, residual_scale, logit_scale", "refused unless neutral"),
    ("attention.causal", "refused when false"),
    ("context_length", "max_position_embeddings"),
    ("tensors output.weight / attn_q.bias / attn_output.bias / attn_q_norm.weight",
     "tie_word_embeddings / attention_bias (q/k/v and o biases kept as present) / Qwen3 q-k norm"),
    ("tokenizer.ggml.bos/eos/padding_token_id", "bos_token_id / eos_token_id / pad_token_id"),
    ("any other {arch}.* key (rope.freq_base_swa, rope.dimension_sections, attention.sliding_window_pattern, "
     "rope.scaling.yarn_*, ...)", "refused by name: unknown metadata is never dropped silently"),
)
# {arch}.* keys read above, plus keys that do not change the computation.
_KNOWN_KEYS = frozenset({
    "vocab_size", "embedding_length", "feed_forward_length", "block_count", "context_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "attention.sliding_window", "attention.scale", "attention.causal",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.attn_factor",
    "attn_logit_softcapping", "final_logit_softcapping", "expert_count",
    "embedding_scale", "residual_scale", "logit_scale",
    "rope.scaling.finetuned", "tensor_data_layout", "expert_used_count",  # informational
})


def _scalar(value: Any, key: str, path: str) -> Any:
    """A metadata value that may be stored per layer: accepted when every layer has the same one."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{path}: per-layer {key}={list(value)} is not supported")
        return value[0]
    return value


def hf_config_from_gguf(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
    """GGUF metadata as the HF `config.json` dict that `from_hf_dict` reads.

    Raises UnsupportedModelError naming the key for metadata that changes the computation and
    has no config.json counterpart here (see CHECKED_GGUF_KEYS); missing required keys are
    left out, so `from_hf_dict` reports them.
    """
    arch = field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHS)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            f"{path}: GGUF with precomputed rope_freqs (Llama-3.1 rope scaling) is not supported; "
            "load the HF safetensors checkpoint instead"
        )

    unknown = sorted(key for key in reader.fields
                     if key.startswith(f"{arch}.") and key[len(arch) + 1:] not in _KNOWN_KEYS)
    if unknown:
        raise UnsupportedModelError(f"{path}: GGUF metadata {unknown} is not supported (it may change the "
                                    "computation and is not implemented)")

    def k(name: str, default: Any = None) -> Any:
        return _scalar(field(reader, f"{arch}.{name}", default), f"{arch}.{name}", path)

    def refuse_unless(name: str, neutral: Any) -> None:
        v = k(name)
        if v is not None and v != neutral:
            raise UnsupportedModelError(f"{path}: GGUF metadata {arch}.{name}={v!r} is not supported")

    if (k("expert_count") or 0) > 0:
        raise UnsupportedModelError(f"{path}: GGUF metadata {arch}.expert_count={k('expert_count')} "
                                    "(mixture of experts) is not supported")
    refuse_unless("attention.causal", True)
    for name in ("embedding_scale", "residual_scale", "logit_scale"):
        refuse_unless(name, 1.0)

    d: dict[str, Any] = {"architectures": [_ARCHS[arch]]}
    put = lambda key, value: value is not None and d.__setitem__(key, value)  # noqa: E731
    put("vocab_size", k("vocab_size") or (len(field(reader, "tokenizer.ggml.tokens") or []) or None))
    put("hidden_size", k("embedding_length"))
    put("intermediate_size", k("feed_forward_length"))
    put("num_hidden_layers", k("block_count"))
    put("num_attention_heads", k("attention.head_count"))
    put("num_key_value_heads", k("attention.head_count_kv"))
    head_dim, value_dim = k("attention.key_length"), k("attention.value_length")
    if head_dim is not None and value_dim is not None and head_dim != value_dim:
        raise UnsupportedModelError(f"{path}: GGUF metadata {arch}.attention.key_length={head_dim} != "
                                    f"{arch}.attention.value_length={value_dim} is not supported")
    if head_dim is None and d.get("hidden_size") and d.get("num_attention_heads"):
        head_dim = int(d["hidden_size"]) // int(d["num_attention_heads"])
    put("head_dim", head_dim)
    scale = k("attention.scale")
    if scale is not None and head_dim and abs(float(scale) - float(head_dim) ** -0.5) > 1e-6 and float(scale) != 0.0:
        raise UnsupportedModelError(f"{path}: GGUF metadata {arch}.attention.scale={scale!r} is not supported")
    rot = k("rope.dimension_count")
    if rot is not None and head_dim and int(rot) != int(head_dim):
        d["partial_rotary_factor"] = int(rot) / int(head_dim)
    put("rope_theta", k("rope.freq_base"))
    kind = k("rope.scaling.type")
    if kind not in (None, "none", ""):
        scaling = {"rope_type": kind}
        put_s = lambda key, value: value is not None and scaling.__setitem__(key, value)  # noqa: E731
        put_s("factor", k("rope.scaling.factor"))
        put_s("original_max_position_embeddings", k("rope.scaling.original_context_length"))
        d["rope_scaling"] = scaling
    if kind != "yarn":  # yarn is refused by from_hf_dict by its type; elsewhere these change the rope
        refuse_unless("rope.scaling.attn_factor", 1.0)
    put("rms_norm_eps", k("attention.layer_norm_rms_epsilon"))
    put("max_position_embeddings", k("context_length"))
    window = k("attention.sliding_window")
    if window:
        if arch == "llama":  # a Llama with one window on every layer is HF's Mistral
            d["architectures"] = ["MistralForCausalLM"]
            d["sliding_window"] = int(window)
        else:
            d["use_sliding_window"], d["sliding_window"] = True, int(window)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        put(name, k(name))
    d["tie_word_embeddings"] = "output.weight" not in names
    d["attention_bias"] = "blk.0.attn_q.bias" in names
    put("bos_token_id", field(reader, "tokenizer.ggml.bos_token_id"))
    put("eos_token_id", field(reader, "tokenizer.ggml.eos_token_id"))
    put("pad_token_id", field(reader, "tokenizer.ggml.padding_token_id"))
    return d


def config_from_gguf(reader: gguf.GGUFReader, path: str, **run_options: Any) -> ModelConfig:
    """ModelConfig of a GGUF file, through the same checks as a config.json (`from_hf_dict`).

    Raises UnsupportedModelError naming the metadata key or config field that is not
    implemented; CheckpointError when a required {arch}.* key is missing.
    """
    d = hf_config_from_gguf(reader, path)
    try:
        cfg = from_hf_dict(d, source=f"{path} (GGUF metadata)", **run_options)
    except UnsupportedModelError:
        raise
    except ValueError as e:
        if "missing required key" not in str(e):
            raise
        raise CheckpointError(f"{path}: GGUF metadata is missing a required {field(reader, 'general.architecture')}.* "
                              f"key ({e})") from None
    # Biases and q/k norms as the tensors have them (a GGUF may carry q/k/v biases without an o bias).
    names = {t.name for t in reader.tensors}
    return cfg.replace(
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
    )


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
    permute = cfg.architecture in ("LlamaForCausalLM", "MistralForCausalLM")  # llama.cpp's "llama"

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
