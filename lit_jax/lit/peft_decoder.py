"""A trained LIT decoder as an HF PEFT LoRA adapter with `lit_config.json`, and PEFT adapters as LIT decoders.

    export_peft(decoder, "exports/decoder_peft")   # adapter_config.json, adapter_model.safetensors (peft loads
                                                   # them), lit_config.json, projection.safetensors
    lit_jax.load_decoder("exports/decoder_peft")   # the same decoder back (lit/trained.py comes here)
    import_peft_adapter("other_lora", base="path/to/hf_model", read_layers=(15,), write_layer=0)

`lit_config.json` says everything a PyTorch user (or lit_jax) needs to use the adapter as a
LIT decoder, as Activation Oracles' ao_config.json does: the read layer(s), where and how
the activations are written (write_layer: after decoder block K, i.e. the output of
model.model.layers[K]; write_mode: "replace" sets the residual stream at the placeholder
positions to the projected vector, "add_norm_matched" adds ||h|| * v / ||v||), the projection
(its weights in projection.safetensors: identity has none; linear y = x @ w + b; mlp
y = x + gelu(x @ w1 + b1) @ w2 + b2; norm_match rescales y to ||x||), the decoder prompt
(style, placeholder token and id, acknowledgement), the base model (source, architecture and
shapes), the tokenizer's fingerprint, the step, and the whole config it was trained with.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from lit_jax.atomic_dir import write_directory
from lit_jax.hf.peft_adapter import ADAPTER_CONFIG, read_adapter_config, read_peft_adapter, write_peft_adapter
from lit_jax.lit.config import LitConfig
from lit_jax.lit.trained import PROJECTION_FILE, DecoderMismatchError, TrainedDecoder, _check_target
from lit_jax.models.lora import LoraConfig

LIT_CONFIG_FILE = "lit_config.json"
LIT_CONFIG_FORMAT = "lit_jax decoder adapter"
LIT_CONFIG_VERSION = 1


class FullFinetuneExportError(ValueError):
    """A decoder without LoRA (a full fine-tune, or one loaded from a merged export) cannot be a LoRA adapter."""


def is_peft_dir(path: str) -> bool:
    """Whether `path` is a directory holding a PEFT adapter (adapter_config.json)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def check_out_dir(directory: str, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Raises FileExistsError, naming `flag`, when `directory` exists, is not empty (or is a file)
    and not overwrite. An empty directory may be written into."""
    if not os.path.exists(directory) or overwrite:
        return
    if not os.path.isdir(directory) or os.listdir(directory):
        raise FileExistsError(f"{os.path.abspath(directory)} exists and is not empty; pass {flag} to replace it")


def base_name_or_path(source: str) -> str:
    """What adapter_config.json's base_model_name_or_path says: the absolute path of an HF
    directory, else "" (a GGUF file, the "smollm2" alias or a random model: transformers'
    from_pretrained cannot take those by name; lit_config.json records the source)."""
    return os.path.abspath(source) if source not in ("", "random") and os.path.isdir(source) else ""


def lit_config_content(decoder: TrainedDecoder) -> dict[str, Any]:
    """The JSON object lit_config.json holds for `decoder` (see the module docstring).

    Raises ValueError for a decoder without its config (TrainedDecoder.config) and as
    lit_jax.lit.job.data_meta does for a placeholder that is not one token.
    """
    from lit_jax.data.pipeline import tokenizer_fingerprint
    from lit_jax.lit.checkpoint import config_meta
    from lit_jax.lit.job import data_meta

    if decoder.config is None:
        raise ValueError("this decoder carries no config (TrainedDecoder.config): load it with load_decoder or "
                         "import_peft_adapter")
    cfg, lcfg, data, config = decoder.cfg, decoder.lcfg, decoder.data_cfg, decoder.config
    meta = data_meta(data, decoder.tokenizer)
    lora = lcfg.lora
    return {
        "format": LIT_CONFIG_FORMAT,
        "version": LIT_CONFIG_VERSION,
        "step": int(decoder.step),
        "read_layers": [int(x) for x in lcfg.read_layers],
        "read_all_layers": bool(data.get("read_all_layers", False)),
        "write_layer": int(lcfg.write_layer),
        "write_mode": lcfg.write_mode,
        "projection": {"kind": lcfg.projection, "norm_match": bool(lcfg.norm_match), "mlp_hidden": int(lcfg.mlp_hidden),
                       "file": PROJECTION_FILE},
        "ablate": lcfg.ablate,
        "prompt_style": meta["prompt_style"],
        "placeholder_token": meta["placeholder"],
        "placeholder_token_id": int(meta["placeholder_id"]),
        "acknowledgement": meta.get("acknowledgement"),
        "train_on_acknowledgement": bool(data.get("train_on_acknowledgement", False)),
        "max_decoder_tokens": int(data.get("max_decoder_tokens", 0) or 0),
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
        "base_model": {
            "source": config.model.source,
            "name_or_path": base_name_or_path(config.model.source),
            "architecture": cfg.architecture,
            "config": config_meta(cfg, lcfg)["model"],  # architecture and shape fields, compared on load
            "lit_jax_model": config.model.to_dict(),  # how lit_jax loads it (source, tokenizer, run options)
            "seed": int(config.get("seed", 0)),  # a "random" model's weights
        },
        "tokenizer": tokenizer_fingerprint(decoder.tokenizer),
        "training_config": config.to_dict(),
    }


def _save_projection(proj: dict, path: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in jax.device_get(proj).items()}, path)


def export_peft(decoder: TrainedDecoder, out_dir: str, *, overwrite: bool = False,
                flag: str = "overwrite=True") -> str:
    """Writes `decoder` as a PEFT LoRA adapter directory at `out_dir`, atomically; returns its absolute path.

    Files: adapter_config.json + adapter_model.safetensors (float32; peft.PeftModel.from_pretrained
    loads them on the base model), lit_config.json (lit_config_content) and projection.safetensors
    (the projection's float32 arrays: linear w [D, D], b [D]; mlp w1 [D, H], b1 [H], w2 [H, D],
    b2 [D]; identity none). Raises FullFinetuneExportError for a decoder without LoRA (export the
    merged model instead), FileExistsError naming `flag` when out_dir is not empty and not
    overwrite (nothing is written), ValueError as lit_config_content does.
    """
    if decoder.lcfg.lora is None or "lora" not in decoder.trainable:
        raise FullFinetuneExportError(
            "this decoder has no LoRA adapters (a full fine-tune, or loaded from a merged export): it cannot be a "
            "LoRA adapter; export the merged model instead (lit_jax.lit.export.export_merged, or "
            "--config.export.hf_dir)")
    check_out_dir(out_dir, overwrite, flag)
    content = lit_config_content(decoder)
    lora = jax.device_get(decoder.trainable["lora"])
    proj = decoder.trainable.get("proj", {})

    def fill(tmp: str) -> None:
        write_peft_adapter(tmp, lora, decoder.lcfg.lora, decoder.cfg, content["base_model"]["name_or_path"])
        with open(os.path.join(tmp, LIT_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, default=str)
        _save_projection(proj, os.path.join(tmp, PROJECTION_FILE))

    return write_directory(out_dir, fill, overwrite=True)


def _read_lit_config(path: str) -> dict:
    file = os.path.join(path, LIT_CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} is a PEFT adapter without {LIT_CONFIG_FILE} (not exported by lit_jax): import it with "
            "lit_jax.lit.peft_decoder.import_peft_adapter(path, base=..., read_layers=..., write_layer=..., "
            "write_mode=..., prompt_style=...)")
    with open(file, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
    if content.get("format") != LIT_CONFIG_FORMAT or content.get("version") != LIT_CONFIG_VERSION:
        raise ValueError(f"{file}: unknown format ({content.get('format')!r} version {content.get('version')!r}; "
                         f"expected {LIT_CONFIG_FORMAT!r} version {LIT_CONFIG_VERSION})")
    return content


def _projection(path: str | dict | None, cfg: Any, lcfg: LitConfig, seed: int, where: str) -> dict:
    """The projection's arrays: from a safetensors file or a dict, checked against the shapes
    lcfg's projection has; None: the projection's initialisation (the identity function)."""
    from lit_jax.lit.projection import init_projection

    init = init_projection(jax.random.key(seed), cfg.hidden_size, lcfg)
    if path is None:
        return {k: np.asarray(v, np.float32) for k, v in init.items()}
    if isinstance(path, str):
        from safetensors.numpy import load_file

        values = load_file(path)
    else:
        values = dict(path)
    values = {k: np.asarray(v, np.float32) for k, v in values.items()}
    want = {k: tuple(v.shape) for k, v in init.items()}
    got = {k: tuple(v.shape) for k, v in values.items()}
    if got != want:
        raise ValueError(f"{where}: projection {lcfg.projection!r} needs arrays {want}, got {got}")
    return values


def _data_config(base: ConfigDict | None, *, read_layers, read_all_layers: bool, prompt_style: str,
                 placeholder_token: str, acknowledgement: str | None, train_on_acknowledgement: bool,
                 max_decoder_tokens: int | None) -> ConfigDict:
    from lit_jax.data import default_data_config
    from lit_jax.data.config import check_data_config

    values = (base if base is not None else default_data_config()).to_dict()
    values.update(read_layers=tuple(int(x) for x in read_layers), read_all_layers=bool(read_all_layers),
                  prompt_style=prompt_style, placeholder_token=placeholder_token,
                  train_on_acknowledgement=bool(train_on_acknowledgement))
    if acknowledgement is not None:
        values["acknowledgement"] = acknowledgement
    if max_decoder_tokens:
        values["max_decoder_tokens"] = int(max_decoder_tokens)
    data = ConfigDict(values)  # built whole: a JSON list field would turn an assigned tuple into a list
    check_data_config(data)
    return data


def load_peft_decoder(path: str, *, step: int | None = None, target: str | None = None,
                      dtype: str | None = None) -> TrainedDecoder:
    """The decoder export_peft wrote at `path` (lit_jax.load_decoder calls this for such a directory).

    The base (the target, and the decoder under the adapters) comes from lit_config.json's
    base model source, or from `target` (other weights of the same model). step: must be the
    exported step if given. Raises FileNotFoundError (no lit_config.json: a PEFT adapter from
    elsewhere, see import_peft_adapter), ValueError (unknown lit_config.json format, another
    step, adapter files that disagree with lit_config.json), DecoderMismatchError naming each
    architecture/shape/tokenizer field (and the placeholder id) where the base differs from what
    the decoder was trained on, PeftAdapterError as read_peft_adapter does.
    """
    from lit_jax.data.pipeline import tokenizer_fingerprint
    from lit_jax.lit.checkpoint import config_meta
    from lit_jax.lit.job import data_meta, load_model
    from lit_jax.settings import lit_section_of

    path = os.path.abspath(path)
    lc = _read_lit_config(path)
    read_adapter_config(path)  # refuse an unusable adapter before loading any model
    if step is not None and int(step) != int(lc["step"]):
        raise ValueError(f"{path} holds step {lc['step']} only (an export keeps one step); asked for step {step}")
    if lc.get("lora") is None:
        raise ValueError(f"{path}/{LIT_CONFIG_FILE}: no lora section")
    base_model = lc["base_model"]
    model = ConfigDict(base_model["lit_jax_model"])
    if target is not None:
        model.source = target
    if dtype is not None:
        model.dtype = dtype
    lora_saved = lc["lora"]
    proj = lc["projection"]
    lcfg = LitConfig(read_layers=tuple(int(x) for x in lc["read_layers"]), write_layer=int(lc["write_layer"]),
                     write_mode=lc["write_mode"], projection=proj["kind"], norm_match=bool(proj["norm_match"]),
                     mlp_hidden=int(proj.get("mlp_hidden", 0)), ablate=lc.get("ablate", "none"),
                     lora=LoraConfig(rank=int(lora_saved["rank"]), alpha=float(lora_saved["alpha"]),
                                     targets=tuple(lora_saved["targets"])))
    seed = int(base_model.get("seed", 0))
    cfg, base, tokenizer = load_model(model, seed)
    _check_target({"model": base_model["config"]}, config_meta(cfg, lcfg), lc.get("tokenizer"),
                  tokenizer_fingerprint(tokenizer), path)
    lora_cfg, lora = read_peft_adapter(path, cfg)
    if (lora_cfg.rank, lora_cfg.alpha, set(lora_cfg.targets)) != (lcfg.lora.rank, lcfg.lora.alpha,
                                                                   set(lcfg.lora.targets)):
        raise ValueError(f"{path}: {ADAPTER_CONFIG} and its weights give {lora_cfg}, but {LIT_CONFIG_FILE} says "
                         f"{lcfg.lora}: the files come from different exports")
    training = lc.get("training_config")
    data = _data_config(ConfigDict(training["data"]) if training else None, read_layers=lcfg.read_layers,
                        read_all_layers=lc.get("read_all_layers", False), prompt_style=lc["prompt_style"],
                        placeholder_token=lc["placeholder_token"], acknowledgement=lc.get("acknowledgement"),
                        train_on_acknowledgement=lc.get("train_on_acknowledgement", False),
                        max_decoder_tokens=lc.get("max_decoder_tokens"))
    placeholder_id = data_meta(data, tokenizer)["placeholder_id"]
    if placeholder_id != lc["placeholder_token_id"]:
        raise DecoderMismatchError(f"decoder {path} was not trained on this target:\n  placeholder "
                                   f"{lc['placeholder_token']!r}: trained as token {lc['placeholder_token_id']}, "
                                   f"target's tokenizer gives {placeholder_id}")
    projection = _projection(os.path.join(path, PROJECTION_FILE), cfg, lcfg, seed, path)
    config = ConfigDict(training) if training else ConfigDict(
        {"task": "lit", "seed": seed, "model": model.to_dict(), "data": data.to_dict(),
         "lit": lit_section_of(lcfg).to_dict()})
    config.model = model
    config.data = data
    trainable = {"proj": projection, "lora": lora}
    return TrainedDecoder(cfg, lcfg, jax.device_put(base), jax.device_put(trainable), tokenizer, data, int(lc["step"]),
                          path, config)


def import_peft_adapter(
    adapter_dir: str,
    *,
    base: str,
    read_layers: tuple[int, ...] | None = None,
    read_all_layers: bool = False,
    write_layer: int = 0,
    write_mode: str = "replace",
    projection: str = "identity",
    projection_weights: str | dict | None = None,
    norm_match: bool = False,
    mlp_hidden: int = 0,
    prompt_style: str = "latentqa",
    placeholder_token: str = "auto",
    acknowledgement: str | None = None,
    max_decoder_tokens: int | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> TrainedDecoder:
    """A PEFT LoRA adapter trained elsewhere on `base` (e.g. peft's save_pretrained), as a LIT decoder.

    base: the base model (an HF directory, a .gguf file or "smollm2"); it is the target too.
    read_layers: the target layer(s) read (default: the middle block, num_layers // 2);
    write_layer / write_mode: where and how the activations enter the decoder (after block K;
    "replace" or "add_norm_matched"); projection: "identity" (default), "linear" or "mlp" with
    projection_weights (a safetensors file or dict of float arrays as export_peft writes them;
    None: the projection's identity initialisation); prompt_style / placeholder_token /
    acknowledgement / max_decoder_tokens: the decoder prompt (defaults: lit_jax's data defaults);
    read_all_layers: every read reads all read_layers at once (prompt_style="oracle").
    The returned decoder has step -1 and a config that export_peft / export_merged write.

    Raises FileNotFoundError (no adapter, no adapter_config.json / adapter_model.safetensors),
    PeftAdapterError (lit_jax.hf.peft_adapter) for what lit_jax cannot represent (rsLoRA, DoRA,
    biases, rank/alpha patterns, modules_to_save, fan_in_fan_out, other target modules, pickled
    weights) and for shapes that do not fit the base, ValueError for layers outside the model,
    an unknown write mode, projection or prompt style, or a placeholder that is not one token.
    """
    from lit_jax.lit.job import data_meta, load_model
    from lit_jax.settings import lit_section_of, model_section

    adapter_dir = os.path.abspath(adapter_dir)
    read_adapter_config(adapter_dir)  # refuse before loading the model
    LitConfig(read_layers=(0,), write_mode=write_mode, projection=projection)  # ValueError for an unknown one, early
    model = model_section(source=base)
    if dtype is not None:
        model.dtype = dtype
    cfg, base_params, tokenizer = load_model(model, seed)
    read_layers = (cfg.num_layers // 2,) if read_layers is None else tuple(int(x) for x in read_layers)
    for name, layers in (("read_layers", read_layers), ("write_layer", (write_layer,))):
        bad = [x for x in layers if not 0 <= int(x) < cfg.num_layers]
        if bad or not layers:
            raise ValueError(f"{name}={layers}: layers must be in [0, {cfg.num_layers}) for this base model")
    lora_cfg, lora = read_peft_adapter(adapter_dir, cfg)
    lcfg = LitConfig(read_layers=read_layers, write_layer=int(write_layer), write_mode=write_mode,
                     projection=projection, norm_match=norm_match, mlp_hidden=mlp_hidden, lora=lora_cfg)
    data = _data_config(None, read_layers=read_layers, read_all_layers=read_all_layers, prompt_style=prompt_style,
                        placeholder_token=placeholder_token, acknowledgement=acknowledgement,
                        train_on_acknowledgement=False, max_decoder_tokens=max_decoder_tokens)
    data_meta(data, tokenizer)  # the placeholder is one token (ValueError otherwise)
    proj = _projection(projection_weights, cfg, lcfg, seed, "projection_weights")
    config = ConfigDict({"task": "lit", "seed": int(seed), "model": model.to_dict(), "data": data.to_dict(),
                         "lit": lit_section_of(lcfg).to_dict()})
    trainable = {"proj": proj, "lora": lora}
    return TrainedDecoder(cfg, lcfg, jax.device_put(base_params), jax.device_put(trainable), tokenizer, data, -1,
                          adapter_dir, config)
