"""Impossible settings refused before any work, each error naming its flag, value and allowed range.

A setting that cannot work (`--config.train.steps=-5`, a read layer past the model's last
block, a mesh for other devices) would otherwise train nothing and exit 0, or fail minutes
later inside a traced function, after the data is prepared and the model loaded. The `lit`
job (lit/job.py run_lit) checks its config in two steps, both before the work dir is written:

  check_lit_settings(config)        values alone: counts, rates, choices (no model, no devices)
  check_lit_against(config, ...)    layers against the model's depth, the mesh against the
                                    device count, the global batch against the mesh

Every check is a small pure function on plain values raising ConfigError (a ValueError), so
the Python API and the other tasks can use the ones that fit them (check_read_settings: the
`read` task; check_layers: the `evaluate` task's probe layers).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

from lit_jax.data.config import PROMPT_STYLES, STORAGES
from lit_jax.data.errors import ON_BAD_RECORD
from lit_jax.lit.config import ABLATIONS, PROJECTIONS
from lit_jax.lit.residual_stream import WRITE_MODES
from lit_jax.models.lora import LORA_TARGETS
from lit_jax.sharding import MESH_AXES


class ConfigError(ValueError):
    """An impossible setting; the message starts with the flag and its value (`--config.train.steps=-5: ...`)."""


def flag(name: str, value: Any) -> str:
    """`--config.<name>=<value>` as a user would type it (tuples as tuples, strings quoted)."""
    shown = tuple(value) if isinstance(value, list) else value
    return f"--config.{name}={shown!r}" if isinstance(shown, str) else f"--config.{name}={shown}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> None:
    """An integer in [low, high] (high None: no upper bound). Raises ConfigError naming the flag."""
    if _is_int(value) and value >= low and (high is None or value <= high):
        return
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    raise ConfigError(f"{flag(name, value)}: must be {allowed}" + (f" ({why})" if why else ""))


def check_real(name: str, value: Any, low: float, *, above: bool, high: float | None = None,
               below: bool = False, why: str = "") -> None:
    """A finite number > low (above=True) or >= low, and < high (below=True) or <= high when high
    is given. NaN and infinities are refused: they would train on garbage without an error.
    Raises ConfigError naming the flag and the interval."""
    ok = _is_real(value) and math.isfinite(value) and (value > low if above else value >= low)
    if ok and high is not None:
        ok = value < high if below else value <= high
    if ok:
        return
    if high is None:
        allowed = f"a finite number {'>' if above else '>='} {low}"
    else:
        allowed = f"a number in {'(' if above else '['}{low}, {high}{')' if below else ']'}"
    raise ConfigError(f"{flag(name, value)}: must be {allowed}" + (f" ({why})" if why else ""))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """One of `choices`. Raises ConfigError listing them."""
    if value not in tuple(choices):
        raise ConfigError(f"{flag(name, value)}: must be one of {tuple(choices)}")


def check_layers(name: str, layers: Sequence[Any], num_layers: int | None, *, allow_empty: bool = False) -> None:
    """Block indices in [0, num_layers) (num_layers None: only >= 0, the depth being unknown yet).
    Raises ConfigError naming the flag, the offending layers and the model's range."""
    given = layers
    layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)  # one layer or several
    if not layers and not allow_empty:
        raise ConfigError(f"{flag(name, given)}: must name at least one layer")
    bad = [x for x in layers if not _is_int(x) or x < 0 or (num_layers is not None and x >= num_layers)]
    if bad:
        allowed = "integers >= 0" if num_layers is None else (
            f"0..{num_layers - 1} (the model has {num_layers} blocks)")
        raise ConfigError(f"{flag(name, given)}: layer(s) {bad} out of range; allowed: {allowed}")


def check_mesh_shape(shape: Sequence[Any], name: str = "mesh.shape") -> None:
    """3 sizes for the axes (data, fsdp, tensor), each >= 1 or one -1 (all remaining devices).
    Raises ConfigError naming the flag."""
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
    if len(shape) != len(MESH_AXES) or not all(_is_int(s) and (s >= 1 or s == -1) for s in shape):
        raise ConfigError(f"{flag(name, shape)}: must be {len(MESH_AXES)} sizes {MESH_AXES}, each >= 1 or -1 "
                          "(the remaining devices)")
    if shape.count(-1) > 1:
        raise ConfigError(f"{flag(name, shape)}: must have at most one -1 (the remaining devices)")


def resolve_mesh_shape(shape: Sequence[int], device_count: int, name: str = "mesh.shape") -> tuple[int, ...]:
    """The mesh shape with its -1 filled in, as sharding.make_mesh builds it over `device_count`
    devices. Raises ConfigError when the sizes' product cannot equal the device count."""
    check_mesh_shape(shape, name)
    given = tuple(int(s) for s in shape)
    known = math.prod(s for s in given if s != -1)
    if -1 in given:
        if device_count % known:
            raise ConfigError(f"{flag(name, given)}: the fixed sizes' product {known} must divide the "
                              f"{device_count} devices (jax.device_count())")
        return tuple(device_count // known if s == -1 else s for s in given)
    if known != device_count:
        raise ConfigError(f"{flag(name, given)}: uses {known} devices; the product of the sizes must be the "
                          f"{device_count} devices (jax.device_count()), or one size -1 (the remaining devices)")
    return given


def check_global_batch(batch_size: int, process_count: int, mesh_shape: Sequence[int], accum_steps: int) -> None:
    """The global batch (data.batch_size x processes) splits evenly into accum_steps micro-batches
    over the data-parallel mesh (data x fsdp): each device gets the same whole number of rows.
    mesh_shape: resolved (resolve_mesh_shape). Raises ConfigError naming data.batch_size and the
    batch sizes allowed."""
    data_parallel = mesh_shape[0] * mesh_shape[1]
    need = data_parallel * accum_steps
    global_batch = batch_size * process_count
    if global_batch % need:
        step = need // math.gcd(need, process_count)  # the smallest per-process batch that fits
        raise ConfigError(
            f"{flag('data.batch_size', batch_size)}: the global batch {global_batch} (data.batch_size x "
            f"{process_count} processes) must divide by the data-parallel mesh size {data_parallel} (data x fsdp of "
            f"mesh.shape {tuple(mesh_shape)}) x train.accum_steps {accum_steps}; allowed: a multiple of {step}, or "
            "change mesh.shape or train.accum_steps")


def check_train_settings(train: Mapping[str, Any]) -> None:
    """The `train` section (lit/train.py TrainConfig): counts and rates in range.
    Raises ConfigError naming the first impossible field."""
    check_int("train.steps", train["steps"], 1, why="optimizer steps")
    check_real("train.lr", train["lr"], 0.0, above=True, why="the peak learning rate")
    # More warmup than steps is allowed: the schedule caps it at steps - 1 (a short test run keeps its warmup).
    check_int("train.warmup_steps", train["warmup_steps"], 0)
    check_real("train.weight_decay", train["weight_decay"], 0.0, above=False)
    check_real("train.clip_norm", train["clip_norm"], 0.0, above=True, why="the global gradient norm clipped to")
    check_int("train.accum_steps", train["accum_steps"], 1, why="micro-batches per step")
    check_int("train.log_every", train["log_every"], 1, why="steps between logged train metrics")
    check_int("train.eval_every", train["eval_every"], 0, why="0: held-out evaluation at the start and end only")
    check_int("train.eval_examples", train["eval_examples"], 0, why="0: every held-out example")
    check_int("train.checkpoint_every", train["checkpoint_every"], 0, why="0: a checkpoint at the end only")
    # 0 kept checkpoints would delete the final one, and with it what a rerun resumes from.
    check_int("train.keep_checkpoints", train["keep_checkpoints"], 1)
    check_int("train.pack_multiple", train["pack_multiple"], 1)
    check_int("train.pack_levels", train["pack_levels"], 1, why="padded size levels per length bucket")
    check_int("train.presize_batches", train["presize_batches"], 0, why="0: no look-ahead")


def check_lit_section(lit: Mapping[str, Any]) -> None:
    """The `lit` section (lit/config.py LitConfig, LoRA flattened): choices and sizes; the write
    layer only >= 0 here (its upper bound is the model's: check_lit_against).
    LoRA fields are checked only when used (not with lit.full_finetune=True).
    Raises ConfigError naming the first impossible field."""
    check_layers("lit.write_layer", lit["write_layer"], None)
    check_choice("lit.write_mode", lit["write_mode"], WRITE_MODES)
    check_choice("lit.projection", lit["projection"], PROJECTIONS)
    check_choice("lit.ablate", lit["ablate"], ABLATIONS)
    check_int("lit.mlp_hidden", lit["mlp_hidden"], 0, why="0: the model's hidden size")
    if lit["full_finetune"]:
        return
    check_int("lit.lora_rank", lit["lora_rank"], 1)
    check_real("lit.lora_alpha", lit["lora_alpha"], 0.0, above=True, why="the LoRA scale is alpha / rank")
    targets = tuple(lit["lora_targets"])
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ConfigError(f"{flag('lit.lora_targets', targets)}: unknown {bad}; allowed: any of {LORA_TARGETS}")


def check_data_settings(data: Mapping[str, Any]) -> None:
    """The `data` section's counts, fractions and choices (data/config.py; check_data_config
    adds the combinations); read layers only >= 0 here (their bound is the model's).
    Raises ConfigError naming the first impossible field."""
    check_layers("data.read_layers", data["read_layers"], None)
    check_int("data.batch_size", data["batch_size"], 1, why="examples per process and step")
    check_real("data.heldout_fraction", data["heldout_fraction"], 0.0, above=False, high=1.0, below=True,
               why="the share of labels held out")
    check_int("data.max_records_per_source", data["max_records_per_source"], 0, why="0: all")
    check_int("data.num_buckets", data["num_buckets"], 1)
    check_int("data.bucket_multiple", data["bucket_multiple"], 1)
    check_real("data.bucket_read_weight", data["bucket_read_weight"], 0.0, above=True)
    check_int("data.max_read_tokens", data["max_read_tokens"], 1)
    check_int("data.max_decoder_tokens", data["max_decoder_tokens"], 1)
    check_int("data.classification_tokens", data.get("classification_tokens", 1), 1)
    check_choice("data.prompt_style", data["prompt_style"], PROMPT_STYLES)
    check_choice("data.on_bad_record", data["on_bad_record"], ON_BAD_RECORD)
    check_choice("data.storage", data["storage"], STORAGES)


def check_demo_settings(demo: Mapping[str, Any]) -> None:
    """The `demo` section (settings.py DemoConfig). Raises ConfigError naming the field."""
    check_int("demo.num_examples", demo["num_examples"], 0, why="0: no demonstration")
    check_int("demo.max_new_tokens", demo["max_new_tokens"], 1)


def check_lit_settings(config: Mapping[str, Any]) -> None:
    """Everything of a `lit` config that can be checked without the model or the devices: the
    train, lit, data, demo and mesh sections' values, then data/config.py's combinations.
    Raises ConfigError (or check_data_config's ValueError) for the first impossible setting."""
    from lit_jax.data.config import check_data_config  # its combinations (prompt style vs read_all_layers, ...)

    check_train_settings(config["train"])
    check_lit_section(config["lit"])
    check_data_settings(config["data"])
    check_data_config(config["data"])
    check_demo_settings(config["demo"])
    check_mesh_shape(config["mesh"]["shape"])


def check_lit_against(config: Mapping[str, Any], *, num_layers: int, device_count: int,
                      process_count: int = 1) -> tuple[int, ...]:
    """A `lit` config against the model's depth and the devices: data.read_layers, lit.write_layer
    and evaluate.probe_layers in [0, num_layers); mesh.shape over `device_count` devices; the
    global batch over the data-parallel mesh and train.accum_steps. Returns the resolved mesh shape.
    Raises ConfigError naming the first impossible setting."""
    check_layers("data.read_layers", config["data"]["read_layers"], num_layers)
    check_layers("lit.write_layer", config["lit"]["write_layer"], num_layers)
    evaluate = config.get("evaluate") or {}
    check_layers("evaluate.probe_layers", evaluate.get("probe_layers", ()), num_layers, allow_empty=True)
    shape = resolve_mesh_shape(config["mesh"]["shape"], device_count)
    check_global_batch(config["data"]["batch_size"], process_count, shape, config["train"]["accum_steps"])
    return shape


def check_read_settings(read: Mapping[str, Any]) -> None:
    """The `read` task's section (configs/read.py): batch and sampling sizes.
    Raises ConfigError naming the first impossible field."""
    check_int("read.batch_size", read["batch_size"], 1)
    check_int("read.max_new_tokens", read["max_new_tokens"], 1)
    check_real("read.temperature", read["temperature"], 0.0, above=False, why="0: greedy")
    check_int("read.top_k", read["top_k"], 0, why="0: no top-k cut")
    check_int("read.read_from_turn", read["read_from_turn"], 0)
    check_int("read.each_token_last", read["each_token_last"], 0, why="0: one answer per read")
    check_int("read.layer", read["layer"], -1, why="-1: the decoder's first trained layer")
