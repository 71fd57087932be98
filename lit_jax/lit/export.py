"""Exporting a trained decoder: an HF PEFT LoRA adapter and/or the merged HF model; the `export` task.

    python -m lit_jax.main --config=configs/export.py --config.decoder=workdirs/smollm2_demo \\
        --config.export.peft_dir=exports/demo_peft [--config.export.hf_dir=exports/demo_merged] \\
        [--config.decoder_step=80] [--config.export.overwrite=True]

The `lit` job calls export_decoder at the end of training with its `export` section.
"""

from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from lit_jax.lit.peft_decoder import LIT_CONFIG_FILE, check_out_dir, export_peft
from lit_jax.lit.trained import PROJECTION_FILE, RUN_FILE, TrainedDecoder, export_sidecar, load_decoder

CLI_OVERWRITE = "--config.export.overwrite=True"


def export_merged(decoder: TrainedDecoder, out_dir: str, *, overwrite: bool = False,
                  flag: str = "overwrite=True") -> str:
    """Writes the decoder's weights (LoRA merged into the base, or its fine-tuned weights) as an HF
    checkpoint at `out_dir`, with the tokenizer, lit_run.json and projection.safetensors (so
    load_decoder loads it), atomically. Returns its absolute path. Raises FileExistsError naming
    `flag` when out_dir is not empty and not overwrite; ValueError for a decoder without its config.
    """
    from lit_jax.hf import export_hf
    from lit_jax.lit.loss import decoder_weights
    from lit_jax.models.lora import merge_lora

    if decoder.config is None:
        raise ValueError("this decoder carries no config (TrainedDecoder.config): load it with load_decoder or "
                         "import_peft_adapter")
    check_out_dir(out_dir, overwrite, flag)
    weights, lora = decoder_weights(decoder.trainable, decoder.base, decoder.cfg, decoder.lcfg)
    if lora is not None:
        weights = merge_lora(decoder.base, lora.params, decoder.lcfg.lora, decoder.cfg)
    extra = export_sidecar(decoder.config, decoder.tokenizer, decoder.trainable["proj"], decoder.step)
    return export_hf(jax.device_get(weights), decoder.cfg, out_dir, tokenizer=decoder.tokenizer, overwrite=True,
                     extra_files=extra)


def _hf_load_call(source: str) -> str:
    """How transformers loads the base model `source` (for the printed instructions)."""
    from lit_jax.hf.smollm2 import resolve_model_path

    if source == "random":
        return "<the base model>"
    path = resolve_model_path(source)
    if path.endswith(".gguf"):
        return (f"AutoModelForCausalLM.from_pretrained({os.path.dirname(os.path.abspath(path))!r}, "
                f"gguf_file={os.path.basename(path)!r})")
    return f"AutoModelForCausalLM.from_pretrained({path!r})"


def export_decoder(decoder: TrainedDecoder, *, peft_dir: str = "", hf_dir: str = "", overwrite: bool = False,
                   flag: str = "overwrite=True") -> dict[str, str]:
    """Writes the PEFT adapter (peft_dir) and/or the merged model (hf_dir); "" skips one.

    Both directories are checked before either is written. Prints where each went and how to
    load it. Returns {"peft": path, "hf": path} for what was written. Raises ValueError for no
    directory or the same one twice, FileExistsError naming `flag` for a non-empty directory
    without overwrite, FullFinetuneExportError for a PEFT export of a decoder without LoRA.
    """
    if not peft_dir and not hf_dir:
        raise ValueError("nothing to export: give a PEFT adapter directory (export.peft_dir) and/or a merged model "
                         "directory (export.hf_dir)")
    if peft_dir and hf_dir and os.path.abspath(peft_dir) == os.path.abspath(hf_dir):
        raise ValueError(f"export.peft_dir and export.hf_dir are both {peft_dir}: give two directories")
    for d in (peft_dir, hf_dir):
        if d:
            check_out_dir(d, overwrite, flag)
    out = {}
    if peft_dir:
        out["peft"] = export_peft(decoder, peft_dir, overwrite=overwrite, flag=flag)
        print(f"PEFT adapter written to {out['peft']} (adapter_config.json, adapter_model.safetensors, "
              f"{LIT_CONFIG_FILE}, {PROJECTION_FILE}). Load it in PyTorch with\n"
              f"  peft.PeftModel.from_pretrained({_hf_load_call(decoder.config.model.source)}, {out['peft']!r})\n"
              f"(write the projected activations after model.model.layers[{decoder.lcfg.write_layer}] as "
              f"{LIT_CONFIG_FILE} says), or as a LIT decoder with lit_jax.load_decoder({out['peft']!r})", flush=True)
    if hf_dir:
        out["hf"] = export_merged(decoder, hf_dir, overwrite=overwrite, flag=flag)
        print(f"merged decoder written to {out['hf']} (with {RUN_FILE} and {PROJECTION_FILE}): "
              f"AutoModelForCausalLM.from_pretrained({out['hf']!r}) loads it, lit_jax.load_decoder({out['hf']!r}) "
              "loads it as a LIT decoder", flush=True)
    return out


def run_export(config: ConfigDict, workdir: str) -> dict[str, str]:
    """The `export` task (configs/export.py): load a decoder, write the configured exports."""
    from lit_jax.settings import ExportConfig, from_section

    export = from_section(ExportConfig, config.export, "export")
    if not config.decoder:
        raise ValueError("--config.decoder is empty: give the work dir of a `lit` run (or an export of one)")
    if not export.peft_dir and not export.hf_dir:
        raise ValueError("nothing to export: give --config.export.peft_dir and/or --config.export.hf_dir")
    for d in (export.peft_dir, export.hf_dir):  # refuse before loading anything
        if d:
            check_out_dir(d, export.overwrite, CLI_OVERWRITE)
    decoder = load_decoder(config.decoder, step=None if config.decoder_step < 0 else int(config.decoder_step),
                           target=config.target or None)
    print(f"decoder {decoder.path} (step {decoder.step})", flush=True)
    return export_decoder(decoder, peft_dir=export.peft_dir, hf_dir=export.hf_dir, overwrite=export.overwrite,
                          flag=CLI_OVERWRITE)
