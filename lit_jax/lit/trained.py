"""A trained decoder, loaded in a new process from what its run saved.

    decoder = load_decoder("workdirs/smollm2_demo")          # latest checkpoint
    decoder = load_decoder("workdirs/smollm2_demo", step=80)  # a given step
    reader = decoder.reader()
    reader.ask([tokenize_read(decoder.tokenizer, dialog, read_from_turn=1)], ["What persona ...?"])

A `lit` run writes `lit_run.json` into its work dir before training: the whole config it
ran with and its tokenizer's fingerprint. Loading rebuilds the model, LIT and data-format
settings from that file, so nothing is repeated on the command line; the target's weights
come from the saved `model.source` unless `target=` names other weights, which must then be
the same model (architecture, shapes, tokenizer) or are refused naming the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, NamedTuple

import jax
import numpy as np
from ml_collections import ConfigDict

from lit_jax.generate import SamplingConfig
from lit_jax.lit.checkpoint import Checkpointer, config_meta, restore_params
from lit_jax.lit.config import LitConfig
from lit_jax.models.config import ModelConfig
from lit_jax.settings import lit_from_section

RUN_FILE = "lit_run.json"
RUN_FILE_VERSION = 1
PROJECTION_FILE = "projection.safetensors"


class DecoderMismatchError(ValueError):
    """A decoder pointed at a target it was not trained on (other architecture, shapes or tokenizer)."""


class TrainedDecoder(NamedTuple):
    """Everything reading and control need: the target (frozen base), the trained parameters,
    and the settings the decoder was trained with."""

    cfg: ModelConfig
    lcfg: LitConfig
    base: Any  # the target's (and the decoder's base) params
    trainable: dict  # {"proj": ..., "lora": ...} or {"proj": ..., "decoder": ...}
    tokenizer: Any
    data_cfg: ConfigDict  # prompt_style, placeholder_token, acknowledgement, read_layers, ...
    step: int
    path: str
    # The whole config it was trained with (lit_run.json's; model.source is the base it runs on), or
    # for an imported PEFT adapter the equivalent (model, seed, data, lit): what exports write.
    config: ConfigDict | None = None

    def reader(self, sampling: SamplingConfig = SamplingConfig(max_new_tokens=48)):
        from lit_jax.lit.read import Reader

        return Reader(self.base, self.trainable, self.cfg, self.lcfg, self.tokenizer, self.data_cfg,
                      sampling=sampling)


def on_mesh(decoder: TrainedDecoder, mesh, *, strict: bool = False) -> TrainedDecoder:
    """The decoder with its base and trained parameters laid out over `mesh` (axes data, fsdp,
    tensor) by the training rules (sharding.py): a model too big for one device reads and
    evaluates across several, each jitted reading function following its inputs' shardings.

    strict: a parameter dimension its mesh axes do not divide is an error instead of replicated
    with a warning. Raises ValueError as sharding.tree_shardings does.
    """
    from lit_jax import sharding as shd
    from lit_jax.lit.train_state import trainable_axes
    from lit_jax.models import llama

    cfg, lcfg = decoder.cfg, decoder.lcfg
    base = jax.device_put(decoder.base, shd.tree_shardings(llama.param_axes(cfg), decoder.base, mesh,
                                                             units=llama.param_units(cfg), strict=strict))
    trainable = jax.device_put(decoder.trainable, shd.tree_shardings(trainable_axes(cfg, lcfg), decoder.trainable,
                                                                       mesh, units=llama.param_units(cfg),
                                                                       strict=strict))
    return decoder._replace(base=base, trainable=trainable)


def _atomic_json(path: str, value: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _run_file_content(config: ConfigDict, tokenizer: Any, **extra: Any) -> dict:
    from lit_jax.data.pipeline import tokenizer_fingerprint

    return {"version": RUN_FILE_VERSION, "config": config.to_dict(), "tokenizer": tokenizer_fingerprint(tokenizer),
            **extra}


def save_run_settings(workdir: str, config: ConfigDict, tokenizer: Any) -> str:
    """Writes `workdir/lit_run.json` (atomically): the run's whole config and tokenizer fingerprint."""
    path = os.path.join(workdir, RUN_FILE)
    _atomic_json(path, _run_file_content(config, tokenizer))
    return path


def export_sidecar(config: ConfigDict, tokenizer: Any, proj: dict, step: int) -> dict:
    """The files an HF export of a decoder carries so load_decoder can use it (lit_jax.hf.export_hf
    extra_files): lit_run.json (as a work dir's, plus the step) and the projection's weights."""
    from safetensors.numpy import save_file

    def settings(path: str) -> None:
        with open(path, "w") as f:
            json.dump(_run_file_content(config, tokenizer, exported_step=int(step)), f, indent=2, default=str)

    def projection(path: str) -> None:
        save_file({k: np.asarray(v, np.float32) for k, v in jax.device_get(proj).items()}, path)

    return {RUN_FILE: settings, PROJECTION_FILE: projection}


def _run_settings(path: str) -> dict:
    file = os.path.join(path, RUN_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"decoder {path!r} does not exist")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a lit work dir or decoder export: it has no {RUN_FILE} (a `lit` "
                                "run writes one before training, and into its export)")
    with open(file, encoding="utf-8") as f:
        settings = json.load(f)
    if settings.get("version") != RUN_FILE_VERSION or "config" not in settings:
        raise ValueError(f"{file}: unknown format (version {settings.get('version')!r})")
    return settings


def _check_target(saved: dict, current: dict, saved_tok: dict | None, current_tok: dict, where: str) -> None:
    diffs = [(k, saved["model"].get(k), v) for k, v in current["model"].items() if saved["model"].get(k) != v]
    if saved_tok is not None:
        for key, name in (("vocab", "vocab size"), ("backend", "tokenizer (vocabulary, merges, pre-tokenizer)"),
                          ("template", "chat template"), ("added", "added tokens")):
            if saved_tok.get(key) != current_tok.get(key):
                shown = (saved_tok.get(key), current_tok.get(key)) if key == "vocab" else ("differs", "")
                diffs.append((name, *shown))
    if diffs:
        lines = "\n".join(f"  {name}: trained with {s!r}, target has {c!r}" if c != "" else f"  {name}: {s}"
                          for name, s, c in diffs)
        raise DecoderMismatchError(f"decoder {where} was not trained on this target:\n{lines}")


def available_steps(path: str) -> list[int]:
    directory = os.path.join(path, "checkpoints")
    if not os.path.isdir(directory):
        return []
    probe = Checkpointer(directory, clean_partial=False)
    try:
        return sorted(probe._mngr.all_steps())
    finally:
        probe.close()


def load_decoder(path: str, *, step: int | None = None, target: str | None = None,
                 dtype: str | None = None, mesh: Any = None, strict: bool = False) -> TrainedDecoder:
    """The decoder a `lit` run trained, from its work dir.

    path: the run's work dir (holding lit_run.json and checkpoints/), a directory its
    export wrote (an HF checkpoint of the merged decoder with lit_run.json and the
    projection; the decoder then runs on its own weights), or a PEFT adapter directory
    written by lit_jax.lit.peft_decoder.export_peft (adapter_config.json + lit_config.json;
    the base model runs with the adapters). step: a saved step (default: the latest; an
    export holds one). target: other weights for the target (default: the run's
    model.source); dtype: override the run's model.dtype. Raises FileNotFoundError (no such
    dir, no lit_run.json, no checkpoint; a PEFT adapter without lit_config.json, which
    import_peft_adapter takes), ValueError naming the available steps for a step
    that was not saved, DecoderMismatchError naming each architecture/shape/tokenizer field
    where the target differs from what the decoder was trained on; for a PEFT adapter
    directory, as lit_jax.lit.peft_decoder.load_peft_decoder.
    """
    from lit_jax.lit.job import data_meta, load_model

    path = os.path.abspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, RUN_FILE)):
        from lit_jax.lit.peft_decoder import is_peft_dir, load_peft_decoder

        if is_peft_dir(path):
            decoder = load_peft_decoder(path, step=step, target=target, dtype=dtype)
            return decoder if mesh is None else on_mesh(decoder, mesh, strict=strict)
    settings = _run_settings(path)
    if os.path.isfile(os.path.join(path, PROJECTION_FILE)):
        decoder = _load_export(path, settings, target=target, dtype=dtype)
        return decoder if mesh is None else on_mesh(decoder, mesh, strict=strict)
    config = ConfigDict(settings["config"])
    if target is not None:
        config.model.source = target
    if dtype is not None:
        config.model.dtype = dtype
    steps = available_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint to load")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step {step} was not saved in {path}/checkpoints; saved steps: {steps}")
    lcfg = lit_from_section(config.lit, config.data.read_layers)
    cfg, base, tokenizer = load_model(config.model, int(config.seed), mesh=mesh, strict=strict)
    ckpt_dir = os.path.join(path, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, clean_partial=False)
    try:
        saved_meta = ckpt.read_meta(step).get("config")
        from lit_jax.data.pipeline import tokenizer_fingerprint

        if saved_meta is not None:
            _check_target(saved_meta, config_meta(cfg, lcfg), settings.get("tokenizer"),
                          tokenizer_fingerprint(tokenizer), f"{path} (step {step})")
        saved = ckpt._mngr.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
    finally:
        ckpt.close()
    trainable = restore_params(ckpt_dir, step, _trainable_like(saved, cfg, lcfg, mesh, strict))
    config.data.read_layers = tuple(int(x) for x in config.data.read_layers)
    data_meta(config.data, tokenizer)  # the placeholder resolves as in training (ValueError otherwise)
    if mesh is None:
        base, trainable = jax.device_put(base), jax.device_put(trainable)
    return TrainedDecoder(cfg, lcfg, base, trainable, tokenizer, config.data, int(step), path, config)


def _trainable_like(saved: Any, cfg: ModelConfig, lcfg: LitConfig, mesh: Any, strict: bool) -> Any:
    """Restore targets for the saved trainable parameters: float32, laid out over `mesh` by the
    training rules (numpy without a mesh)."""
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), np.float32), saved)
    if mesh is None:
        return like
    from lit_jax import sharding as shd
    from lit_jax.lit.train_state import trainable_axes
    from lit_jax.models import llama

    shardings = shd.tree_shardings(trainable_axes(cfg, lcfg), like, mesh, units=llama.param_units(cfg), strict=strict)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)


def _load_export(path: str, settings: dict, *, target: str | None, dtype: str | None) -> TrainedDecoder:
    """A decoder from its HF export: the target from the run's model.source (or `target`), the
    decoder's merged weights and projection from `path`."""
    from safetensors.numpy import load_file

    from lit_jax.data.pipeline import tokenizer_fingerprint
    from lit_jax.hf import load_params
    from lit_jax.lit.job import data_meta, load_model
    from lit_jax.settings import model_run_options

    config = ConfigDict(settings["config"])
    if target is not None:
        config.model.source = target
    if dtype is not None:
        config.model.dtype = dtype
    lcfg = lit_from_section(config.lit, config.data.read_layers)
    cfg, base, tokenizer = load_model(config.model, int(config.seed))
    dec_cfg, dec_params = load_params(path, **model_run_options(config.model))
    _check_target(config_meta(dec_cfg, lcfg), config_meta(cfg, lcfg), settings.get("tokenizer"),
                  tokenizer_fingerprint(tokenizer), path)
    lcfg = dataclasses.replace(lcfg, lora=None)  # the export holds the decoder's own (merged) weights
    proj = {k: np.asarray(v, np.float32) for k, v in load_file(os.path.join(path, PROJECTION_FILE)).items()}
    config.data.read_layers = tuple(int(x) for x in config.data.read_layers)
    data_meta(config.data, tokenizer)
    trainable = {"proj": proj, "decoder": dec_params}
    return TrainedDecoder(cfg, lcfg, jax.device_put(base), jax.device_put(trainable), tokenizer, config.data,
                          int(settings.get("exported_step", -1)), path, config)
