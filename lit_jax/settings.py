"""One source of defaults: frozen dataclasses define every setting; configs are built from them.

Each section of a LIT config (`configs/common.py`) is the ConfigDict of a dataclass's
defaults (`section`), and the job turns it back into that dataclass strictly
(`from_section`): a field of the config that no dataclass declares is an error naming
it, never silently dropped. So `lit_jax.lit.train.train(tcfg=TrainConfig(...), ...)` from Python
and `python -m lit_jax.main` train with the same defaults.

  model   source/tokenizer/random (this module) + ModelConfig's run options (models/config.py)
  mesh    MeshConfig (here)          lit    LitConfig + LoraConfig (lit/config.py, models/lora.py)
  train   TrainConfig (lit/train.py) data   default_data_config() (data/config.py)
  demo    DemoConfig (here)          export ExportConfig (here)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ml_collections import ConfigDict

from lit_jax.lit.config import LitConfig
from lit_jax.lit.train import TrainConfig
from lit_jax.models.config import RUN_OPTIONS, ModelConfig
from lit_jax.models.lora import LoraConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """shape: (data, fsdp, tensor), one entry may be -1; distributed: jax.distributed.initialize()
    (multi-host); strict: a parameter dimension its mesh axes do not divide is an error
    instead of a replicated dimension with a warning."""

    shape: tuple[int, ...] = (-1, 1, 1)
    distributed: bool = False
    strict: bool = False


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """After training: answer questions about `num_examples` held-out reads from files whose
    name contains `source_contains`, generating at most `max_new_tokens`."""

    num_examples: int = 3
    source_contains: str = "system"
    max_new_tokens: int = 40


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """hf_dir: "" = no export; else the merged decoder as an HF checkpoint there.
    peft_dir: "" = no export; else the decoder as an HF PEFT LoRA adapter there (adapter_config.json,
    adapter_model.safetensors) with lit_config.json and projection.safetensors (lit/peft_decoder.py).
    overwrite: replace a non-empty existing directory (else the export is refused)."""

    hf_dir: str = ""
    peft_dir: str = ""
    overwrite: bool = False


# Which ModelConfig-independent model fields the `model` section has.
MODEL_SOURCE_FIELDS = ("source", "tokenizer", "random")
# The LIT section flattens LitConfig's LoRA into lora_* fields; read layers come from data.read_layers.
_LORA_FIELDS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets"}


def _defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def section(cls, **overrides: Any) -> ConfigDict:
    """The ConfigDict of a settings dataclass's defaults (and `overrides`)."""
    return ConfigDict({**_defaults(cls), **overrides})


def _check_keys(values: Mapping[str, Any], allowed, where: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"config.{where}.{unknown[0]} is not a setting (known: {sorted(allowed)}); "
                         "a field nothing reads would be silently ignored")


def from_section(cls, values: Mapping[str, Any], where: str, **extra: Any):
    """cls(**values, **extra); ValueError naming `config.<where>.<field>` for a field cls does not have."""
    values = dict(values)
    _check_keys(values, [f.name for f in dataclasses.fields(cls)], where)
    if isinstance(values.get("shape"), list):
        values["shape"] = tuple(values["shape"])
    return cls(**values, **extra)


def model_section(**overrides: Any) -> ConfigDict:
    """source: an HF directory, a .gguf file, "smollm2", or "random" (a random model of `random`'s
    shape over the tokenizer of `tokenizer`, for tests); plus ModelConfig's run options."""
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in RUN_OPTIONS}
    random = ConfigDict(dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=16, tie_embeddings=True, rope_theta=10000.0))
    return ConfigDict({"source": "smollm2", "tokenizer": "smollm2", "random": random, **fields, **overrides})


def model_run_options(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig run options of a `model` section; ValueError for an unknown field."""
    _check_keys(model, (*MODEL_SOURCE_FIELDS, *RUN_OPTIONS), "model")
    return {k: model[k] for k in RUN_OPTIONS if k in model}


def lit_section() -> ConfigDict:
    """LitConfig's defaults, LoRA flattened (lora_rank, lora_alpha, lora_targets, full_finetune)."""
    values = {k: v for k, v in _defaults(LitConfig).items() if k not in ("read_layers", "lora")}
    lora = _defaults(LoraConfig)
    values.update({flat: lora[field] for flat, field in _LORA_FIELDS.items()}, full_finetune=False)
    return ConfigDict(values)


def lit_from_section(lit: Mapping[str, Any], read_layers) -> LitConfig:
    """LitConfig from a `lit` section and data.read_layers; ValueError for an unknown field."""
    values = dict(lit)
    _check_keys(values, [*lit_section().keys()], "lit")
    lora_values = {field: values.pop(flat) for flat, field in _LORA_FIELDS.items()}
    lora = None if values.pop("full_finetune") else LoraConfig(**{**lora_values, "targets": tuple(lora_values["targets"])})
    return LitConfig(read_layers=tuple(int(x) for x in read_layers), lora=lora, **values)


def lit_section_of(lcfg: LitConfig) -> ConfigDict:
    """The `lit` section that lit_from_section turns back into `lcfg` (given its read_layers)."""
    lora = lcfg.lora or LoraConfig()
    values = {k: getattr(lcfg, k) for k in lit_section().keys() if hasattr(lcfg, k) and k != "full_finetune"}
    values.update({flat: getattr(lora, field) for flat, field in _LORA_FIELDS.items()},
                  full_finetune=lcfg.lora is None)
    values["lora_targets"] = tuple(values["lora_targets"])
    return ConfigDict(values)


def train_section() -> ConfigDict:
    """TrainConfig's defaults, less `seed` (the config's top-level seed)."""
    return ConfigDict({k: v for k, v in _defaults(TrainConfig).items() if k != "seed"})


def train_from_config(config: ConfigDict) -> TrainConfig:
    """TrainConfig from config.train (seed: config.seed); ValueError for an unknown field."""
    if "seed" in config.train:
        raise ValueError("config.train.seed is not a setting: the run's seed is config.seed")
    return from_section(TrainConfig, config.train, "train", seed=int(config.seed))
