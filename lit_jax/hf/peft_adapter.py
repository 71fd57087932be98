"""The HF PEFT LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors`, out and in.

    write_peft_adapter(directory, lora, lora_cfg, cfg)   # what peft.PeftModel.from_pretrained(model, directory) loads
    lora_cfg, lora = read_peft_adapter(directory, cfg)   # an adapter peft saved (save_pretrained), as lit_jax LoRA

The tensors are named as peft 0.21 saves a LoRA on a transformers *ForCausalLM (checked by
saving one, tests/test_peft_export.py):

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

and peft computes y = W x + (lora_alpha / r) * B (A x): lit_jax's LoRA (models/lora.py) with
A = a[i] ([r, in]) and B = b[i].T (b is [L, r, out]), scale alpha / rank. Reading refuses,
naming the field or tensor, whatever this arithmetic cannot represent (DoRA, rsLoRA, per-module
ranks or alphas, biases, extra trained modules, other target modules, other shapes) and never
opens pickled (.bin) weights.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LORA_TARGETS, LoraConfig, projection_dims

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# lit_jax LoRA target -> the module path inside a transformers decoder layer (Llama, Mistral, Qwen2/3).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BY_MODULE_NAME = {path.split(".")[-1]: t for t, path in HF_MODULES.items()}  # "q_proj" -> "q"
_PREFIX = "base_model.model.model.layers."
_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")

# adapter_config.json fields that do not change what the saved adapter computes (names, bookkeeping,
# training-only settings, initialisation configs whose base-weight changes init_lora_weights names).
_INFORMATIONAL = ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "exclude_modules",
                  "layers_to_transform", "layers_pattern", "base_model_name_or_path", "revision", "inference_mode",
                  "auto_mapping", "peft_version", "lora_dropout", "init_lora_weights", "megatron_core",
                  "qalora_group_size", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying")
# Fields whose non-default value changes the arithmetic: what each would need.
_MUST_BE_UNSET = {
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r))",
    "use_dora": "DoRA's magnitude vectors",
    "lora_bias": "a bias on lora_B",
    "fan_in_fan_out": "transposed (Conv1D, GPT-2 style) weights",
    "rank_pattern": "a different rank per module",
    "alpha_pattern": "a different alpha per module",
    "modules_to_save": "fully trained copies of other modules",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "adapters on parameters instead of modules",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA (adapters switched on by invocation tokens)",
    "use_qalora": "quantisation-aware LoRA",
    "megatron_config": "Megatron parallel layers",
    "loftq_config": "LoftQ (the base weights were quantised and changed)",
    "arrow_config": "Arrow routing between adapters",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA (the base weights were changed)",
}
# init_lora_weights values that leave the base weights as they were (others, e.g. "pissa",
# "olora", "loftq", "corda", change the base and the adapter only works on the changed base).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


class PeftAdapterError(ValueError):
    """A PEFT adapter that lit_jax cannot represent, or that does not fit the base model."""


def tensor_name(layer: int, target: str, which: str) -> str:
    """The safetensors name peft saves for one adapter matrix: which is "A" or "B"."""
    return f"{_PREFIX}{layer}.{HF_MODULES[target]}.lora_{which}.weight"


def _unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def adapter_config(lora_cfg: LoraConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    """The adapter_config.json peft loads for lit_jax adapters of `lora_cfg` (every layer adapted)."""
    alpha = lora_cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora_cfg.rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "target_modules": [HF_MODULES[t].split(".")[-1] for t in LORA_TARGETS if t in lora_cfg.targets],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }


def write_peft_adapter(directory: str, lora: dict, lora_cfg: LoraConfig, cfg: ModelConfig,
                       base_model_name_or_path: str = "") -> None:
    """Writes adapter_config.json and adapter_model.safetensors (float32) into `directory` (which exists).

    lora: {target: {"a": [L, r, in], "b": [L, r, out]}} for each of lora_cfg.targets (numpy or
    jax arrays, any float dtype). Not atomic by itself: call it inside
    lit_jax.atomic_dir.write_directory's fill. Raises PeftAdapterError for a missing target or
    an array whose shape does not fit `cfg` and lora_cfg.rank.
    """
    dims = projection_dims(cfg)
    tensors: dict[str, np.ndarray] = {}
    for t in lora_cfg.targets:
        if t not in lora:
            raise PeftAdapterError(f"LoRA target {t!r} has no weights")
        a, b = np.asarray(lora[t]["a"], np.float32), np.asarray(lora[t]["b"], np.float32)
        fan_in, fan_out = dims[t]
        want_a, want_b = (cfg.num_layers, lora_cfg.rank, fan_in), (cfg.num_layers, lora_cfg.rank, fan_out)
        if a.shape != want_a or b.shape != want_b:
            raise PeftAdapterError(f"LoRA {t!r}: a {a.shape}, b {b.shape}; the model needs a {want_a}, b {want_b}")
        for i in range(cfg.num_layers):
            tensors[tensor_name(i, t, "A")] = np.ascontiguousarray(a[i])  # [r, in]
            tensors[tensor_name(i, t, "B")] = np.ascontiguousarray(b[i].T)  # [out, r]
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(lora_cfg, base_model_name_or_path), f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(directory: str) -> dict[str, Any]:
    """The parsed adapter_config.json of a PEFT LoRA adapter that lit_jax can represent.

    Needs no base model (call it before loading one). Raises FileNotFoundError (no directory,
    no adapter_config.json), PeftAdapterError naming the field for: another PEFT type or task,
    rsLoRA, DoRA, bias != "none", rank/alpha patterns, modules_to_save, fan_in_fan_out, an
    initialisation that changed the base weights, target modules other than
    q/k/v/o/gate/up/down_proj, and any field this module does not know that is set; also for
    weights only in pickle files (.bin: never opened).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}: not a PEFT adapter")
    try:
        with open(path, encoding="utf-8-sig") as f:
            conf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftAdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise PeftAdapterError(f"{path}: expected a JSON object")

    def refuse(what: str) -> None:
        raise PeftAdapterError(f"{path}: {what}; lit_jax represents plain LoRA adapters on "
                               f"{sorted(_BY_MODULE_NAME)} only")

    if conf.get("peft_type") != "LORA":
        refuse(f"peft_type={conf.get('peft_type')!r} is not 'LORA'")
    if conf.get("task_type") not in (None, "CAUSAL_LM"):
        refuse(f"task_type={conf.get('task_type')!r} (a causal language model adapter, CAUSAL_LM, is needed)")
    if conf.get("bias", "none") != "none":
        refuse(f"bias={conf['bias']!r} (trained biases; only 'none' is supported)")
    for key, what in _MUST_BE_UNSET.items():
        if not _unset(conf.get(key)):
            refuse(f"{key}={conf[key]!r} ({what}) is not supported")
    if conf.get("init_lora_weights", True) not in _PLAIN_INITS:
        refuse(f"init_lora_weights={conf['init_lora_weights']!r} changed the base model's weights at initialisation, "
               "so the adapter does not apply to the original base")
    unknown = sorted(k for k in conf if k not in _INFORMATIONAL and k not in _MUST_BE_UNSET and k != "bias"
                     and not _unset(conf[k]))
    if unknown:
        refuse(f"field {unknown[0]}={conf[unknown[0]]!r} is unknown to lit_jax and set, so it may change the adapter")
    for key in ("r", "lora_alpha"):
        value = conf.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            refuse(f"{key}={value!r} (a positive number is needed)")
    if not float(conf["r"]).is_integer():
        refuse(f"r={conf['r']!r} (an integer rank is needed)")
    modules = conf.get("target_modules")
    if isinstance(modules, list):
        bad = [m for m in modules if m not in _BY_MODULE_NAME]
        if bad:
            refuse(f"target_modules {bad} are not supported")
        if not modules:
            refuse("target_modules is empty")
    elif not isinstance(modules, str):  # a regex or "all-linear": the saved tensors say which modules
        refuse(f"target_modules={modules!r} (a list of module names or a pattern is needed)")
    layers = conf.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or (isinstance(layers, list)
                                                                and all(isinstance(x, int) for x in layers))):
        refuse(f"layers_to_transform={layers!r} (an int or a list of ints is needed)")
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        pickled = [n for n in sorted(os.listdir(directory)) if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
        if pickled:
            raise PeftAdapterError(f"{directory}: only pickled weights ({', '.join(pickled)}); lit_jax loads "
                                   f"{ADAPTER_WEIGHTS} only and never unpickles (re-save the adapter with peft's "
                                   "save_pretrained(..., safe_serialization=True))")
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}")
    return conf


def read_peft_adapter(directory: str, cfg: ModelConfig) -> tuple[LoraConfig, dict[str, dict[str, np.ndarray]]]:
    """(LoraConfig, params {target: {"a": [L, r, in], "b": [L, r, out]}} float32) of a PEFT LoRA
    adapter for the base model `cfg`.

    Layers outside `layers_to_transform` (when the adapter names a subset) get zero adapters,
    which leave them unchanged, as in peft. Raises as read_adapter_config does, and
    PeftAdapterError naming the tensor for: a tensor that is not a LoRA A/B matrix of a
    supported module (e.g. lm_head, embed_tokens, DoRA magnitudes), a missing tensor, a layer
    the base does not have, a shape that does not fit `cfg` and the rank.
    """
    conf = read_adapter_config(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    rank, alpha = int(conf["r"]), float(conf["lora_alpha"])
    layers = conf.get("layers_to_transform")
    wanted = set(range(cfg.num_layers)) if layers is None else ({layers} if isinstance(layers, int) else set(layers))
    outside = sorted(i for i in wanted if not 0 <= i < cfg.num_layers)
    if outside:
        raise PeftAdapterError(f"{directory}: layers_to_transform names layer(s) {outside}; the base model has "
                               f"{cfg.num_layers} layers")
    dims = projection_dims(cfg)
    found: dict[tuple[str, int, str], str] = {}
    with safe_open(weights, framework="numpy") as f:
        names = list(f.keys())
        for name in names:
            m = _TENSOR.match(name)
            target = _BY_MODULE_NAME.get(m.group(3)) if m else None
            if m is None or target is None or HF_MODULES[target].split(".")[0] != m.group(2):
                raise PeftAdapterError(f"{weights}: tensor {name!r} is not a LoRA A/B matrix of a supported module "
                                       f"({sorted(_BY_MODULE_NAME)}); lit_jax cannot represent it")
            layer = int(m.group(1))
            if layer not in wanted:
                raise PeftAdapterError(f"{weights}: tensor {name!r} is for layer {layer}, outside the adapted layers "
                                       f"(base model: {cfg.num_layers} layers; layers_to_transform={layers!r})")
            found[(target, layer, m.group(4))] = name
        targets = [t for t in LORA_TARGETS if any(k[0] == t for k in found)]
        listed = conf["target_modules"]
        if isinstance(listed, list):
            absent = [m for m in listed if _BY_MODULE_NAME[m] not in targets]
            if absent:
                raise PeftAdapterError(f"{weights}: target_modules lists {absent} but it holds no weights for them")
            unlisted = [HF_MODULES[t].split(".")[-1] for t in targets if HF_MODULES[t].split(".")[-1] not in listed]
            if unlisted:
                raise PeftAdapterError(f"{weights}: holds weights for {unlisted}, which target_modules does not list")
        if not targets:
            raise PeftAdapterError(f"{weights}: holds no LoRA weights")
        params = {}
        for t in targets:
            fan_in, fan_out = dims[t]
            a = np.zeros((cfg.num_layers, rank, fan_in), np.float32)
            b = np.zeros((cfg.num_layers, rank, fan_out), np.float32)
            for i in sorted(wanted):
                for which, want, out in (("A", (rank, fan_in), a), ("B", (fan_out, rank), b)):
                    name = found.get((t, i, which))
                    if name is None:
                        raise PeftAdapterError(f"{weights}: missing tensor {tensor_name(i, t, which)!r}")
                    value = f.get_tensor(name)
                    if value.shape != want:
                        raise PeftAdapterError(
                            f"{weights}: tensor {name!r} has shape {list(value.shape)}; the base model "
                            f"({cfg.architecture}, hidden {cfg.hidden_size}, r={rank}) needs {list(want)}: the "
                            "adapter was made for another model (or another rank)")
                    out[i] = value.astype(np.float32) if which == "A" else value.astype(np.float32).T
            params[t] = {"a": a, "b": b}
    return LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets)), params
