"""Model configuration: one frozen (hashable) dataclass for every supported Llama-family model.

Hashable so it can be a static argument of `jax.jit`; built from an HF `config.json`
(transformers v4 or v5 layout) or from GGUF metadata, and written back as `config.json`
on export. Architectures we do not implement fail here, by name, not deep in a forward.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from lit_jax.models.attention import ATTENTION_IMPLEMENTATIONS

# HF architecture name -> model_type. Each differs from Llama only in flags of ModelConfig.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "gate_up", "matmuls")
RUN_OPTIONS = ("dtype", "scan_layers", "remat", "attention")  # ModelConfig fields that do not change the weights


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this package does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "llama3" or "linear"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, plus how to run it.

    The first block of fields is the architecture (from the checkpoint); the last block
    (`RUN_OPTIONS`: dtype, scan_layers, remat, attention) are run-time choices that do not
    change the weights. Their defaults here are the only definition of those defaults.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama/Qwen3 with attention_bias
    o_bias: bool = False  # Llama/Qwen3 with attention_bias
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None  # Mistral
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Run-time choices.
    dtype: str = "float32"  # parameter and activation dtype: "float32" | "bfloat16"
    scan_layers: bool = True  # lax.scan over the layer stack (fast compile) vs unrolled (fast run on CPU)
    remat: str = "none"  # activation checkpointing per block: one of REMAT_POLICIES
    attention: str = "auto"  # models/attention.py: auto (blocked on CPU, fused on GPU/TPU) | blocked | fused | dense

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# HF config.json fields that change the computation of a supported architecture, and what
# `from_hf_dict` does with each (issue 12, fault 4). The rule: a field transformers reads for
# these architectures is either implemented or refused by name; never ignored. Fields that
# transformers itself ignores for Llama/Mistral/Qwen2/Qwen3 (Granite's multipliers, Gemma's
# query_pre_attn_scalar, ...) do not change its logits, so they do not change ours either.
CHECKED_HF_FIELDS = (
    ("architectures / model_type", "implemented for Llama, Mistral, Qwen2, Qwen3; others refused"),
    ("hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads",
     "implemented"),
    ("head_dim", "implemented (default hidden_size // num_attention_heads)"),
    ("hidden_act", "'silu' (alias 'swish') implemented; anything else refused"),
    ("hidden_activation", "Gemma-style spelling of hidden_act: same rule"),
    ("mlp_bias", "False implemented; True refused"),
    ("attention_bias", "implemented (q/k/v/o biases; Qwen2 always has q/k/v biases)"),
    ("rms_norm_eps", "implemented"),
    ("tie_word_embeddings", "implemented"),
    ("rope_theta / rope_parameters.rope_theta", "implemented (v4 and v5 layouts)"),
    ("rope_scaling / rope_parameters rope_type", "default, llama3, linear implemented; "
     "yarn, dynamic, longrope, su, ntk and any other type refused; per-layer-type rope_parameters refused"),
    ("partial_rotary_factor", "1.0 implemented; any other value refused"),
    ("sliding_window", "implemented for Mistral (every layer); Qwen2/3 only with use_sliding_window"),
    ("use_sliding_window / max_window_layers", "Qwen2/3: False implemented; True refused"),
    ("layer_types", "all 'full_attention' implemented (Mistral: all 'sliding_attention' too); "
     "mixed or other per-layer attention refused"),
    ("attn_logit_softcapping / final_logit_softcapping", "None implemented; any value refused"),
    ("quantization_config", "refused (weights would be read without their scales); dequantize first"),
    ("pretraining_tp", "accepted: transformers' tp>1 path only splits the same matmuls into slices "
     "and sums them (identical math, differences at rounding level)"),
    ("attention_dropout", "accepted: dropout is inactive at eval (logits); training here runs without it"),
    ("max_position_embeddings", "recorded; used only as llama3 rope's context when absent from rope_scaling"),
    ("bos_token_id / eos_token_id / pad_token_id", "recorded"),
    ("torch_dtype / dtype", "not the computation: the run's dtype option chooses precision"),
)

_SILU = ("silu", "swish")


def _check_hf_fields(d: Mapping[str, Any], source: str, model_type: str) -> None:
    """Raises UnsupportedModelError naming the first field of `d` (a parsed config.json) that
    changes the computation in a way this package does not implement (see CHECKED_HF_FIELDS)."""
    def refuse(what: str) -> None:
        raise UnsupportedModelError(f"{source}: {what} is not supported")

    for key in ("hidden_act", "hidden_activation"):
        act = d.get(key)
        if act is not None and act not in _SILU:
            refuse(f"{key}={act!r} (only 'silu' is implemented)")
    if d.get("mlp_bias"):
        refuse("mlp_bias=True")
    prf = d.get("partial_rotary_factor")
    if prf is None:
        prf = (d.get("rope_parameters") or {}).get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        refuse(f"partial_rotary_factor={prf!r} (only rotary embeddings over the whole head are implemented)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(key) is not None:
            refuse(f"{key}={d[key]!r}")
    if d.get("quantization_config"):
        method = (d["quantization_config"] or {}).get("quant_method", "?")
        refuse(f"quantization_config (quant_method={method!r}; dequantize the checkpoint first)")
    if model_type != "mistral" and d.get("use_sliding_window"):
        refuse(f"{model_type} with use_sliding_window=True")
    layer_types = d.get("layer_types")
    if layer_types:
        kinds = set(layer_types)
        ok = {"full_attention"} | ({"sliding_attention"} if model_type == "mistral" and d.get("sliding_window") else set())
        if not kinds <= ok or (model_type == "mistral" and len(kinds) > 1):
            refuse(f"layer_types={sorted(kinds)} (per-layer attention types other than "
                   f"{sorted(ok)} for every layer)")


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads RoPE settings from either transformers v5 (`rope_parameters`) or v4 keys."""
    params = dict(d.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModelError(
            f"per-layer-type rope_parameters {sorted(params)} are not supported (one RoPE for every layer)")
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "llama3":
        return float(theta), RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(scaling["factor"]))
    raise UnsupportedModelError(
        f"unsupported rope scaling type {kind!r} in rope_scaling (supported: default, llama3, linear)")


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(int(i) for i in x)
    return (int(x),)


def from_hf_dict(d: Mapping[str, Any], source: str = "config.json", **run_options: Any) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json`; `source` names it in errors.

    Raises UnsupportedModelError naming the field for an architecture or any field value that
    changes the computation and is not implemented (CHECKED_HF_FIELDS), ValueError for a
    missing required key. The GGUF loader maps its metadata to this dict layout and comes
    through here too, so both loaders accept and refuse the same models.
    """
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(model_type, f"<model_type {model_type!r}>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    try:
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        _check_hf_fields(d, source, model_type)
        try:
            theta, scaling = _rope_from_hf(d)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{source}: {e}") from None
        attention_bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window") if model_type == "mistral" else None
        return ModelConfig(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            **run_options,
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None


def load_hf_config(model_dir: str, **run_options: Any) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir!r}")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON: {e}") from None
    return from_hf_dict(d, source=path, **run_options)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild this model (v4 and v5 keys both written)."""
    model_type = SUPPORTED_ARCHITECTURES[cfg.architecture]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        extra = {"factor": s.factor}
        if s.kind == "llama3":
            extra.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
        rope = {"rope_type": s.kind, "rope_theta": cfg.rope_theta, **extra}
        legacy_scaling = {"rope_type": s.kind, **extra}
    d: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": cfg.dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
        "pad_token_id": cfg.pad_token_id,
    }
    if model_type in ("llama", "qwen3"):
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = False
    if model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    return d
