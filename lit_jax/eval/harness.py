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
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lit_jax.eval import classification as cls
from lit_jax.eval import latentqa as lqa
from lit_jax.eval.controls import CONTROLS, variants

TASKS = ("latentqa", "hidden_system", "classification", "relations")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """tasks: which of TASKS; controls: which of lit_jax.eval.controls.CONTROLS run beside the
    trained decoder. k: candidates per multiple-choice question. latentqa_examples: held-out
    examples for the loss (and the pool multiple-choice groups are drawn from);
    hidden_system_examples: system-prompt reads (0: all held out). classification_datasets:
    () = every dataset with a yes/no task; per_dataset items each, reading the last
    classification_tokens tokens of the sentence. relation_layers: layers for the probe and
    Patchscope baselines (() = the decoder's read layers). generate: also score generated
    answers (classification, relations); off = likelihood scores only (faster)."""

    tasks: tuple[str, ...] = TASKS
    controls: tuple[str, ...] = CONTROLS
    k: int = 4
    latentqa_examples: int = 128
    hidden_system_examples: int = 0
    classification_datasets: tuple[str, ...] = ()
    per_dataset: int = 16
    classification_tokens: int = 1
    relation_layers: tuple[int, ...] = ()
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
        for name in ("k", "batch_size", "per_dataset", "classification_tokens"):
            if getattr(self, name) < (2 if name in ("k", "per_dataset") else 1):
                raise ValueError(f"evaluate.{name}={getattr(self, name)} is too small")
        unknown = [d for d in self.classification_datasets if d not in cls.YES_NO_TASKS]
        if unknown:
            raise ValueError(f"evaluate.classification_datasets: no yes/no task for {unknown}; "
                             f"known: {sorted(cls.YES_NO_TASKS)}")


def trained_labels(data_cfg: Any) -> set[str]:
    """The labels of a decoder's training split (from its data settings, without tokenizing)."""
    from lit_jax.data.config import resolve_data_dir
    from lit_jax.data.errors import BadRecords
    from lit_jax.data.pipeline import split_by_label
    from lit_jax.data.readers import read_all_sources

    families = read_all_sources(data_cfg, resolve_data_dir(data_cfg), BadRecords("skip"))
    return {r.label for r in split_by_label(families, data_cfg.heldout_fraction, data_cfg.split_seed)["train"]}


def evaluate_decoder(decoder, settings: EvalSettings = EvalSettings(), *, progress: bool = True) -> dict:
    """Runs settings.tasks on a TrainedDecoder (lit_jax.load_decoder); returns the results dict
    (see lit_jax.eval.report): results["tasks"][task][variant][metric] = interval, plus
    "reference" (chance / majority), "baselines" (relations), "wall_s" per task."""
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
            for v in bar:
                bar.set_postfix_str(v.name)
                out[v.name] = {**lqa.answer_loss(v, items, batch_size=s.batch_size, seed=s.seed),
                               "multiple_choice": lqa.choice_task(v, pool, groups, batch_size=s.batch_size,
                                                                  seed=s.seed)["accuracy"]}
            out["reference"] = {"multiple_choice": 1.0 / s.k}
            results["headline"][task] = "multiple_choice"
        elif task == "hidden_system":
            items = lqa.heldout_items(heldout, decoder.tokenizer, contains=lqa.SYSTEM_SOURCE,
                                      limit=s.hidden_system_examples, seed=s.seed)
            items = _one_per_label(items)
            groups = lqa.make_groups(items, s.k, same_question=False, seed=s.seed)
            for v in bar:
                bar.set_postfix_str(v.name)
                out[v.name] = {"accuracy": lqa.choice_task(v, items, groups, batch_size=s.batch_size,
                                                           seed=s.seed)["accuracy"]}
            out["reference"] = {"accuracy": 1.0 / s.k}
            out["groups"] = len(groups)
            results["headline"][task] = "accuracy"
        elif task == "classification":
            out.update(_classification(decoder, runs, s, bar))
            results["headline"][task] = "by_probability/unseen"
        elif task == "relations":
            out.update(_relations(decoder, runs, s, bar))
            results["headline"][task] = "accuracy"
        results["tasks"][task] = out
        results["wall_s"][task] = round(time.perf_counter() - t0, 1)
    return results


def _one_per_label(items: list) -> list:
    seen, out = set(), []
    for it in items:
        if it.label not in seen:
            seen.add(it.label)
            out.append(it)
    return out


def _classification(decoder, runs, s: EvalSettings, bar) -> dict:
    from lit_jax.data.config import resolve_data_dir

    names = list(s.classification_datasets or cls.YES_NO_TASKS)
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
            per = r[how]["datasets"]
            entry[how] = {"all": r[how]["overall"], "datasets": per}
            for group, members in (("seen", seen), ("unseen", unseen)):
                if members:
                    mask = [it.dataset in members for it in items]
                    credit = _credit(per, members, items, mask)
                    entry[how][group] = credit
        entry["examples"] = r.get("examples", [])
        out[v.name] = entry
        out["reference"] = {"by_probability": r["majority"], "by_generation": r["majority"]}
    return out


def _credit(per: dict, members: list, items, mask) -> dict:
    from lit_jax.eval import stats

    hits = []
    for n in members:
        iv = per[n]
        hits += [1.0] * round(iv["value"] * iv["n"]) + [0.0] * (iv["n"] - round(iv["value"] * iv["n"]))
    return stats.accuracy(np.asarray(hits))


def _relations(decoder, runs, s: EvalSettings, bar) -> dict:
    raise NotImplementedError("relations: pending (lit_jax/eval/relations.py)")


def run_evaluate(config, workdir: str) -> dict:
    """The `evaluate` task: load the decoder named by config.decoder, run the tasks, write
    results.json / results.md / plots into config.evaluate.out_dir (default WORKDIR/eval), print the table."""
    from lit_jax.eval.report import markdown, write_report
    from lit_jax.lit.trained import load_decoder
    from lit_jax.settings import from_section

    if not config.decoder:
        raise ValueError("--config.decoder: give a lit run's work dir or a decoder export")
    settings = from_section(EvalSettings, config.evaluate, "evaluate")
    step = config.decoder_step if config.decoder_step >= 0 else None
    decoder = load_decoder(config.decoder, step=step, target=config.target or None)
    results = evaluate_decoder(decoder, settings)
    out_dir = config.out_dir or os.path.join(workdir, "eval")
    write_report(results, out_dir)
    print(markdown(results), flush=True)
    print(f"wall time per task (s): {results['wall_s']}\nwritten to {out_dir}", flush=True)
    return results
