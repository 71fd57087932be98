"""Runs the evaluation tasks on a trained decoder with its controls; the `evaluate` task.

    from lit_jax import load_decoder
    from lit_jax.eval import evaluate_decoder, EvalSettings
    results = evaluate_decoder(load_decoder("workdirs/smollm2_demo"), EvalSettings(tasks=("hidden_system",)))

Tasks (see each module): latentqa (held-out answer loss and token accuracy, multiple choice
among other held-out labels' answers to the same question), hidden_system (which of k
personas/goals, from the user turn's activations with the system turn masked),
classification (Activation Oracles' yes/no protocol), relations (the decoder's generated
object vs a linear probe and a Patchscope on the same activations). Every task runs each
variant of lit_jax.eval.controls.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from lit_jax.data.readers import YES_NO
from lit_jax.eval import classification as cls
from lit_jax.eval import latentqa as lqa
from lit_jax.eval import stats
from lit_jax.eval.controls import CONTROLS, variants

TASKS = ("latentqa", "hidden_system", "classification", "relations")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """tasks: which of TASKS; controls: which of lit_jax.eval.controls.CONTROLS run beside the
    trained decoder. k: candidates per multiple-choice question. latentqa_examples: held-out
    examples for the loss; choice_groups: multiple-choice groups (of k held-out examples with
    one question and k labels) drawn from all held-out examples;
    hidden_system_examples: system-prompt reads (0: all held out), each tested with
    hidden_system_pairs of its label's QA pairs. classification_datasets:
    () = every dataset with a yes/no task; per_dataset items each, reading the last
    classification_tokens tokens of the sentence. probe_layers: layers of the accuracy-vs-layer
    plots (linear probes for relations and classification, Patchscope for relations; the
    decoder's read layer is always one);
    relation_examples: held-out relation items (0: all). generate: also score generated
    answers (classification, relations); off = likelihood scores only (faster)."""

    tasks: tuple[str, ...] = TASKS
    controls: tuple[str, ...] = CONTROLS
    k: int = 4
    latentqa_examples: int = 128
    choice_groups: int = 24
    hidden_system_examples: int = 0
    hidden_system_pairs: int = 2
    classification_datasets: tuple[str, ...] = ()
    per_dataset: int = 16
    classification_tokens: int = 1
    probe_layers: tuple[int, ...] = ()
    relation_examples: int = 0
    batch_size: int = 16
    seed: int = 0
    generate: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a list from JSON or the command line is a tuple here
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"evaluate.tasks: unknown {bad}; choose from {TASKS}")
        bad = [c for c in self.controls if c not in CONTROLS]
        if bad:
            raise ValueError(f"evaluate.controls: unknown {bad}; choose from {CONTROLS}")
        for name in ("k", "batch_size", "per_dataset", "classification_tokens", "hidden_system_pairs",
                     "choice_groups"):
            if getattr(self, name) < (2 if name in ("k", "per_dataset") else 1):
                raise ValueError(f"evaluate.{name}={getattr(self, name)} is too small")
        unknown = [d for d in self.classification_datasets if d not in YES_NO]
        if unknown:
            raise ValueError(f"evaluate.classification_datasets: no yes/no task for {unknown}; "
                             f"known: {sorted(YES_NO)}")


def trained_labels(data_cfg: Any) -> set[str]:
    """The labels of a decoder's training split (from its data settings, without tokenizing)."""
    from lit_jax.data.config import resolve_data_dir
    from lit_jax.data.errors import BadRecords
    from lit_jax.data.pipeline import split_by_label
    from lit_jax.data.readers import read_all_sources

    families = read_all_sources(data_cfg, resolve_data_dir(data_cfg), BadRecords("skip"))
    return {r.label for r in split_by_label(families, data_cfg.heldout_fraction, data_cfg.split_seed)["train"]}


def evaluate_decoder(decoder, settings: EvalSettings = EvalSettings(), *, progress: bool = True,
                     after_task: Callable[[dict], None] | None = None) -> dict:
    """Runs settings.tasks on a TrainedDecoder (lit_jax.load_decoder); returns the results dict
    (see lit_jax.eval.report): results["tasks"][task][variant][metric] = interval, plus
    "reference" (chance / majority), "baselines" (relations), "wall_s" per task.
    after_task(results so far) runs after each task (the evaluate task writes its report then,
    so a long run's finished tasks are on disk)."""
    from lit_jax.data import build_splits

    reader = decoder.reader()
    runs = variants(reader, ("trained", *settings.controls), settings.seed)
    results: dict[str, Any] = {
        "decoder": {"path": decoder.path, "step": decoder.step, "architecture": decoder.cfg.architecture,
                    "read_layers": list(decoder.lcfg.read_layers), "write_layer": decoder.lcfg.write_layer,
                    "write_mode": decoder.lcfg.write_mode, "prompt_style": decoder.data_cfg.prompt_style},
        "settings": dataclasses.asdict(settings), "tasks": {}, "headline": {}, "wall_s": {}}
    heldout = None
    if {"latentqa", "hidden_system"} & set(settings.tasks):
        heldout = build_splits(decoder.data_cfg, decoder.tokenizer)["heldout"]
    s = settings
    for task in settings.tasks:
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        bar = tqdm(runs, desc=f"evaluate {task}", disable=not progress, dynamic_ncols=True)
        if task == "latentqa":
            items = lqa.heldout_items(heldout, decoder.tokenizer, limit=s.latentqa_examples, seed=s.seed)
            pool = lqa.heldout_items(heldout, decoder.tokenizer, seed=s.seed)
            groups = lqa.make_groups(pool, s.k, same_question=True, seed=s.seed)
            order = np.random.default_rng(s.seed).permutation(len(groups))[: s.choice_groups]
            groups = [groups[i] for i in sorted(order)]
            for v in bar:
                bar.set_postfix_str(v.name)
                out[v.name] = {**lqa.answer_loss(v, items, batch_size=s.batch_size, seed=s.seed),
                               "multiple_choice": lqa.choice_task(v, pool, groups, batch_size=s.batch_size,
                                                                  seed=s.seed)["accuracy"]}
            out["reference"] = {"multiple_choice": 1.0 / s.k}
            results["headline"][task] = "multiple_choice"
        elif task == "hidden_system":
            items = lqa.heldout_items(heldout, decoder.tokenizer, contains=lqa.SYSTEM_SOURCE, seed=s.seed)
            labels = list(dict.fromkeys(it.label for it in items))  # seeded order (heldout_items)
            if s.hidden_system_examples:
                keep = set(labels[: s.hidden_system_examples])
                items = [it for it in items if it.label in keep]
            for v in bar:
                bar.set_postfix_str(v.name)
                out[v.name] = {"accuracy": lqa.hidden_system(v, items, s.k, pairs=s.hidden_system_pairs,
                                                             batch_size=s.batch_size, seed=s.seed)["accuracy"]}
            out["reference"] = {"accuracy": 1.0 / s.k}
            results["headline"][task] = "accuracy"
        elif task == "classification":
            out.update(_classification(decoder, runs, s, bar))
            results["headline"][task] = "by_probability/unseen" if out["unseen"] else "by_probability/all"
        elif task == "relations":
            out.update(_relations(decoder, runs, s, bar))
            results["headline"][task] = "accuracy"
        results["tasks"][task] = out
        results["wall_s"][task] = round(time.perf_counter() - t0, 1)
        if after_task is not None:
            after_task(results)
    return results


def _classification(decoder, runs, s: EvalSettings, bar) -> dict:
    from lit_jax.data.config import resolve_data_dir

    names = list(s.classification_datasets or YES_NO)
    trained = trained_labels(decoder.data_cfg)
    seen = [n for n in names if f"classification:{n}" in trained]
    unseen = [n for n in names if n not in seen]
    items = cls.make_items(decoder.tokenizer, resolve_data_dir(decoder.data_cfg), names, s.per_dataset,
                           num_tokens=s.classification_tokens, seed=s.seed)
    out: dict[str, Any] = {"seen_in_training": seen, "unseen": unseen}
    for v in bar:
        bar.set_postfix_str(v.name)
        r = cls.classify(v, items, batch_size=s.batch_size, seed=s.seed, generate=s.generate)
        entry = {}
        for how in ("by_probability", "by_generation"):
            if how not in r:
                continue
            entry[how] = {"all": r[how]["overall"], "datasets": r[how]["datasets"]}
            for group, members in (("seen", seen), ("unseen", unseen)):
                if members:
                    mask = np.asarray([it.dataset in members for it in items])
                    entry[how][group] = stats.accuracy(r[how]["correct"][mask])
        entry["examples"] = r.get("examples", [])
        out[v.name] = entry
        out["reference"] = {"by_probability": r["majority"], "by_generation": r["majority"]}
    read_layer = int(decoder.lcfg.read_layers[0])
    layers = tuple(dict.fromkeys((*s.probe_layers, read_layer)))
    out["by_layer"] = cls.probe_by_layer(decoder.base, decoder.cfg, decoder.tokenizer,
                                         resolve_data_dir(decoder.data_cfg), items, layers, seed=s.seed)
    for row in out["by_layer"]:
        if row["layer"] == read_layer and "trained" in out:
            row["decoder"] = {"accuracy": out["trained"]["by_probability"]["all"]["value"]}
    return out


FACTUAL = ("relations/factual/*.json",)


def relation_task_items(data_cfg, limit: int, seed: int) -> list:
    """The factual relation items split as the decoder's run split them (held-out subjects never
    trained on), or, for a decoder not trained on relations, split by subject with its data
    seed and held-out fraction (every subject is then unseen by the decoder; the split only
    trains the probe). At most `limit` held-out items (0: all), a seeded sample; the others
    are dropped (not moved to the probe's training side)."""
    from lit_jax.data.readers import family
    from lit_jax.eval import relations as rel

    try:
        items = [it for it in rel.relation_items_from_config(data_cfg) if it.source.startswith("relations/factual/")]
    except ValueError:
        items = []
    if not items:
        items = rel.relation_items(data_cfg.data_dir, FACTUAL, max(data_cfg.heldout_fraction, 0.1), data_cfg.split_seed)
    held = [i for i, it in enumerate(items) if it.heldout]
    if limit and limit < len(held):
        keep = set(np.random.default_rng(seed).choice(held, size=limit, replace=False).tolist())
        items = [it for i, it in enumerate(items) if not it.heldout or i in keep]
    return items


def _relations(decoder, runs, s: EvalSettings, bar) -> dict:
    from lit_jax.eval import relations as rel

    items = relation_task_items(decoder.data_cfg, s.relation_examples, s.seed)
    held = rel.heldout(items)
    layer = None if decoder.data_cfg.get("read_all_layers", False) else int(decoder.lcfg.read_layers[0])
    out: dict[str, Any] = {"layer": layer, "heldout_items": len(held)}
    for v in bar:
        bar.set_postfix_str(v.name)
        order = (v.reads(list(range(len(held))), [it.label for it in held], s.seed) if v.shuffled else None)
        short = _short_reader(v.reader, 8)  # an object is a few tokens
        r = rel.decoder_relations(short, held, layer, batch_size=max(len(held), 1), read_order=order,
                                  text_only=v.text_only)  # one batch: one compiled generation
        out[v.name] = {"accuracy": stats.accuracy(np.asarray(r["correct"], float))}
        out.setdefault("examples", {})[v.name] = [
            {"text": it.text, "object": it.object, "answer": a} for it, a in list(zip(held, r["answers"]))[:4]]
    base_layer = layer if layer is not None else int(decoder.lcfg.read_layers[0])
    layers = tuple(dict.fromkeys((*s.probe_layers, base_layer)))
    rows = rel.relations_by_layer(decoder.base, decoder.cfg, decoder.tokenizer, items, layers,
                                  batch_size=2 * s.batch_size, patchscope_prompts=("identity", "relation"))
    at = next(r for r in rows if r["layer"] == base_layer)
    out["baselines"] = {
        "linear_probe": {"accuracy": stats.accuracy(np.asarray(at["probe"]["correct"], float))},
        "patchscope_identity": {"accuracy": stats.accuracy(np.asarray(at["patchscope"]["correct"], float))},
        "patchscope_relation": {"accuracy": stats.accuracy(np.asarray(at["patchscope_relation"]["correct"], float))},
    }
    out["probe_coverage"] = at["probe"].get("coverage")
    out["reference"] = {"accuracy": at["majority"]["accuracy"]}
    out["by_layer"] = [{"layer": r["layer"], "majority": {"accuracy": r["majority"]["accuracy"]},
                        **{m: {"accuracy": r[m]["accuracy"]} for m in ("probe", "patchscope", "patchscope_relation")}}
                       for r in rows]
    trained = out.get("trained", {}).get("accuracy")
    if trained is not None:
        for row in out["by_layer"]:
            if row["layer"] == base_layer:
                row["decoder"] = {"accuracy": trained["value"]}
    return out


def _short_reader(reader, max_new_tokens: int):
    from lit_jax.generate import SamplingConfig
    from lit_jax.lit.read import Reader

    return Reader(reader.base, reader.trainable, reader.cfg, reader.lcfg, reader.tokenizer, reader.data_cfg,
                  sampling=SamplingConfig(max_new_tokens=max_new_tokens))


def eval_mesh(shape) -> "jax.sharding.Mesh":
    """The mesh evaluation runs on: `shape` (data, fsdp, tensor) over the first prod(shape) devices,
    or over all of them when one entry is -1 (unlike training, evaluation need not use every device).
    Raises ValueError naming --config.mesh.shape when there are too few devices or the shape is malformed."""
    import jax

    from lit_jax import sharding as shd
    from lit_jax.config_checks import check_mesh_shape

    check_mesh_shape(shape)
    shape = tuple(int(s) for s in shape)
    devices = jax.devices()
    if -1 not in shape:
        if int(np.prod(shape)) > len(devices):
            raise ValueError(f"--config.mesh.shape={shape} needs {int(np.prod(shape))} devices; {len(devices)} "
                             "are visible")
        devices = devices[:int(np.prod(shape))]
    return shd.make_mesh(shape, devices=devices)


def run_evaluate(config, workdir: str) -> dict:
    """The `evaluate` task: load the decoder named by config.decoder, run the tasks, write
    results.json / results.md / plots into config.evaluate.out_dir (default WORKDIR/eval), print the table."""
    from lit_jax.config_checks import check_layers
    from lit_jax.eval.report import markdown, write_report
    from lit_jax import sharding as shd
    from lit_jax.lit.trained import load_decoder
    from lit_jax.settings import MeshConfig, from_section

    if not config.decoder:
        raise ValueError("--config.decoder: give a lit run's work dir or a decoder export")
    settings = from_section(EvalSettings, config.evaluate, "evaluate")
    step = config.decoder_step if config.decoder_step >= 0 else None
    mesh_cfg = from_section(MeshConfig, config.mesh, "mesh") if "mesh" in config else MeshConfig(shape=(1, 1, 1))
    mesh = eval_mesh(mesh_cfg.shape)
    decoder = load_decoder(config.decoder, step=step, target=config.target or None,
                           mesh=mesh if mesh.size > 1 else None, strict=mesh_cfg.strict)
    # Probe layers past the model's last block would fail only when their task runs, after the ones before it.
    check_layers("evaluate.probe_layers", settings.probe_layers, decoder.cfg.num_layers, allow_empty=True)
    out_dir = config.out_dir or os.path.join(workdir, "eval")
    with shd.mesh_rules(mesh):  # the activation constraints of a decoder laid over several devices
        results = evaluate_decoder(decoder, settings, after_task=lambda partial: write_report(partial, out_dir))
    print(markdown(results), flush=True)
    print(f"wall time per task (s): {results['wall_s']}\nwritten to {out_dir}", flush=True)
    return results
