"""The `lit` job of the command line: load the model, build the data, train, evaluate, demonstrate, export.

Everything is driven by the config: configs/common.py builds every section from the settings
dataclasses of lit_jax/settings.py, where each field is documented.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from lit_jax import sharding as shd
from lit_jax.config_checks import check_lit_against, check_lit_settings
from lit_jax.data import build_splits, make_batch_iterator, make_eval_iterator, resolve_placeholder
from lit_jax.generate import SamplingConfig
from lit_jax.hf import load_params, load_tokenizer, place_params
from lit_jax.hf.gguf_in import config_from_gguf, load_gguf, open_gguf
from lit_jax.hf.smollm2 import resolve_model_path
from lit_jax.hf.tokenizer import tokenizer_from_gguf
from lit_jax.lit.checkpoint import config_meta
from lit_jax.lit.config import LitConfig
from lit_jax.lit.export import CLI_OVERWRITE, export_decoder
from lit_jax.lit.peft_decoder import FullFinetuneExportError, check_out_dir
from lit_jax.lit.read import Reader
from lit_jax.lit.train import TrainConfig, train
from lit_jax.eval.harness import EvalSettings
from lit_jax.lit.trained import TrainedDecoder, save_run_settings
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig, load_hf_config
from lit_jax.settings import (DemoConfig, ExportConfig, MeshConfig, from_section, lit_from_section, model_run_options,
                              train_from_config)


def model_header(m: ConfigDict) -> tuple[int, Any]:
    """(number of decoder blocks, GGUF reader or None) of the model `m` names, without its weights:
    `m.random`'s shape, an HF directory's config.json, or a GGUF file's header. The reader is for
    load_model, so the header of a GGUF file is parsed once (seconds for SmolLM2).
    Raises FileNotFoundError for a missing path, UnsupportedModelError / CheckpointError as the loaders do."""
    if m.source == "random":
        return int(m.random.num_layers), None
    run = model_run_options(m)
    path = resolve_model_path(m.source)
    if path.endswith(".gguf"):
        reader = open_gguf(path)
        return config_from_gguf(reader, path, **run).num_layers, reader
    if not os.path.exists(path):  # load_params' message, before load_hf_config's "no config.json"
        raise FileNotFoundError(f"model path {path!r} does not exist (expected an HF directory or a .gguf file)")
    return load_hf_config(path, **run).num_layers, None


def load_model(m: ConfigDict, seed: int = 0, gguf_reader: Any = None, *, mesh: Any = None,
               strict: bool = False) -> tuple[ModelConfig, dict, Any]:
    """(cfg, params, tokenizer). source "random" builds a random model of `m.random` shape
    over the tokenizer of `m.tokenizer` (for tests and dry runs). gguf_reader: the source's GGUF
    header already parsed (model_header), shared by the weights and the tokenizer.
    mesh: None gives numpy params; a Mesh gives jax.Arrays laid out by the training rules, an
    HF directory read straight into shards (hf.load_params)."""
    run = model_run_options(m)
    if m.source == "random":
        tokenizer = load_tokenizer(resolve_model_path(m.tokenizer))
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tokenizer),
                          eos_token_ids=(int(tokenizer.eos_token_id),), pad_token_id=tokenizer.pad_token_id,
                          **dict(m.random), **run)
        params = jax.device_get(llama.init_params(jax.random.key(seed), cfg))
        return cfg, params if mesh is None else place_params(params, cfg, mesh, strict), tokenizer
    path = resolve_model_path(m.source)
    if gguf_reader is not None:
        cfg, params = load_gguf(path, gguf_reader, **run)
        return (cfg, params if mesh is None else place_params(params, cfg, mesh, strict),
                tokenizer_from_gguf(path, gguf_reader))
    cfg, params = load_params(path, mesh=mesh, strict=strict, **run)
    return cfg, params, load_tokenizer(path)


def lit_config(config: ConfigDict) -> LitConfig:
    """LitConfig of a config's `lit` section and `data.read_layers` (strict: see lit_jax/settings.py)."""
    return lit_from_section(config.lit, config.data.read_layers)


def train_config(config: ConfigDict) -> TrainConfig:
    """TrainConfig of a config's `train` section and seed (strict: see lit_jax/settings.py)."""
    return train_from_config(config)


def data_meta(data: ConfigDict, tokenizer: Any) -> dict:
    """The data settings that change what a trained decoder means: the decoder prompt it was
    trained with (style, the resolved placeholder token, the latentqa style's acknowledgement turn).
    Raises ValueError for a placeholder that is not one token."""
    placeholder, placeholder_id = resolve_placeholder(tokenizer, data.placeholder_token)
    meta = {"prompt_style": data.prompt_style, "placeholder": placeholder, "placeholder_id": placeholder_id}
    if data.prompt_style == "latentqa":  # the oracle style has no acknowledgement turn
        meta["acknowledgement"] = data.acknowledgement.strip()
    return meta


def run_meta(cfg: ModelConfig, lcfg: LitConfig, data: ConfigDict, tokenizer: Any) -> dict:
    """The checkpoint meta of a `lit` run: structured (JSON) config compared on resume (lit/checkpoint.py
    config_meta: model architecture and shape, LitConfig, and data_meta), plus readable summaries."""
    return {"architecture": cfg.architecture, "lit": repr(lcfg),
            "config": config_meta(cfg, lcfg, data=data_meta(data, tokenizer))}


def demo_examples(heldout, n: int, source_contains: str) -> list[int]:
    """The first example of each of the first `n` held-out labels whose source file matches."""
    ids, labels = [], set()
    for i in range(len(heldout)):
        d = heldout.describe(i)
        if source_contains in d["source"] and d["label"] not in labels:
            ids.append(i)
            labels.add(d["label"])
            if len(ids) == n:
                break
    return ids


def run_demo(reader: Reader, heldout, demo: DemoConfig) -> list[dict]:
    ids = demo_examples(heldout, demo.num_examples, demo.source_contains)
    rows = []
    if not ids:
        return rows
    exs = [heldout[i] for i in ids]
    reads = [(np.asarray(e["read_tokens"]), np.asarray(e["read_positions"])) for e in exs]
    described = [heldout.describe(i) for i in ids]
    answers = reader.ask(reads, [d["question"] for d in described])
    for d, a in zip(described, answers):
        rows.append({"label": d["label"], "question": d["question"], "true_answer": d["answer"], "decoded": a,
                     "read": d["read"]})
    return rows


def print_demo(rows: list[dict]) -> None:
    print("\nAnswers about held-out system prompts (the decoder sees only the activations):", flush=True)
    for r in rows:
        read = r["read"]
        shown = read if isinstance(read, str) else json.dumps(read)[:300]
        print(f"\n  read:     {shown}\n  question: {r['question']}\n  true:     {r['true_answer']}\n"
              f"  decoded:  {r['decoded']}", flush=True)


def check_export(export: ExportConfig, lcfg: LitConfig) -> None:
    """Refuses, before any training, an export the end of the run could not write: a non-empty
    directory without export.overwrite (FileExistsError), a PEFT adapter of a full fine-tune (ValueError)."""
    if export.peft_dir and lcfg.full_finetune:
        raise FullFinetuneExportError("config.export.peft_dir: a full fine-tune (lit.full_finetune=True) cannot be a "
                                      "LoRA adapter; export the merged model instead (--config.export.hf_dir)")
    for d in (export.peft_dir, export.hf_dir):
        if d:
            check_out_dir(d, export.overwrite, CLI_OVERWRITE)


def run_evaluation(decoder: TrainedDecoder, settings: EvalSettings, out_dir: str) -> dict:
    """The job's closing evaluation (lit_jax/eval): report files in out_dir, a few lines printed."""
    from lit_jax.eval import evaluate_decoder
    from lit_jax.eval.report import summary_lines, write_report

    results = evaluate_decoder(decoder, settings)
    write_report(results, out_dir)
    print(f"\nevaluation (held-out; intervals 95%; table and plots in {out_dir}):", flush=True)
    for line in summary_lines(results):
        print("  " + line, flush=True)
    return {"tasks": results["tasks"], "wall_s": results["wall_s"]}


def run_lit(config: ConfigDict, workdir: str) -> dict:
    # An impossible value fails first, naming its flag and the allowed range (config_checks.py); then every
    # section becomes its settings dataclass: an unknown field fails before any work.
    check_lit_settings(config)
    lcfg, tcfg = lit_config(config), train_config(config)
    mesh_cfg = from_section(MeshConfig, config.mesh, "mesh")
    demo, export = from_section(DemoConfig, config.demo, "demo"), from_section(ExportConfig, config.export, "export")
    evaluation = from_section(EvalSettings, config.evaluate, "evaluate")  # the closing evaluation (tasks=(): none)
    check_export(export, lcfg)
    shd.maybe_initialize_distributed(mesh_cfg.distributed)
    # Layers against the model's depth (its config, not its weights), the mesh and batch against the devices:
    # refused before the work dir is written, the data prepared or anything compiled.
    num_layers, gguf_reader = model_header(config.model)
    check_lit_against(config, num_layers=num_layers, device_count=jax.device_count(),
                      process_count=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(mesh_cfg.shape)
    # laid out over the mesh as it loads: an HF directory is read straight into each host's shards
    cfg, base, tokenizer = load_model(config.model, config.seed, gguf_reader, mesh=mesh, strict=mesh_cfg.strict)
    del gguf_reader  # the file's memory map is not needed past loading
    if jax.process_index() == 0:
        save_run_settings(workdir, config, tokenizer)  # what load_decoder rebuilds the decoder from
    logging.info("model %s (%d params), mesh %s, %s", cfg.architecture, llama.num_params(base), dict(mesh.shape),
                 lcfg)

    splits = build_splits(config.data, tokenizer)
    train_it = make_batch_iterator(splits["train"], config.data)
    heldout = splits["heldout"]
    evaluated = heldout.subset(tcfg.eval_examples)
    print(f"data: {len(splits['train'])} train / {len(heldout)} held-out examples (evaluating on {len(evaluated)}), "
          f"buckets (R, S, T) {list(splits['train'].buckets)}", flush=True)
    meta = run_meta(cfg, lcfg, config.data, tokenizer)
    state, result = train(cfg=cfg, lcfg=lcfg, tcfg=tcfg, base=base, mesh=mesh, train_batches=train_it,
                          heldout_batches=lambda: make_eval_iterator(evaluated, config.data), workdir=workdir,
                          meta=meta, strict_sharding=mesh_cfg.strict)
    summary = dict(result)
    first, last = result.get("heldout_first"), result.get("heldout_last")
    if first and last:
        when = "untrained" if first["step"] == 0 else f"resumed at step {first['step']}"
        print(f"\nheld-out answer loss: {first['loss']:.3f} ({when}) -> "
              f"{last['loss']:.3f} (step {last['step']}); token accuracy {first['accuracy']:.3f} -> "
              f"{last['accuracy']:.3f}; wall {result['wall_s']:.0f} s", flush=True)

    if demo.num_examples and jax.process_index() == 0:
        reader = Reader(base, state.params, cfg, lcfg, tokenizer, config.data,
                        sampling=SamplingConfig(max_new_tokens=demo.max_new_tokens))
        summary["demo"] = run_demo(reader, heldout, demo)
        print_demo(summary["demo"])

    if evaluation.tasks and jax.process_index() == 0:
        summary["evaluation"] = run_evaluation(
            TrainedDecoder(cfg, lcfg, base, state.params, tokenizer, config.data, tcfg.steps, workdir, config),
            evaluation, os.path.join(workdir, "eval"))

    if (export.hf_dir or export.peft_dir) and jax.process_index() == 0:
        trained = TrainedDecoder(cfg, lcfg, base, jax.device_get(state.params), tokenizer, config.data, tcfg.steps,
                                 os.path.abspath(workdir), config)
        written = export_decoder(trained, peft_dir=export.peft_dir, hf_dir=export.hf_dir, overwrite=export.overwrite,
                                 flag=CLI_OVERWRITE)
        if "hf" in written:
            summary["export"] = written["hf"]
        if "peft" in written:
            summary["export_peft"] = written["peft"]

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary
