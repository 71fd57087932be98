"""Relational-knowledge baselines on the real SmolLM2-135M-Instruct: linear probe and Patchscope by read layer.

The untrained model reads every relations/factual sample ("The capital city of Japan is",
template i mod n filled with the subject, as training reads it); subjects are split into
train / held-out as the training pipeline splits them for data.relations_label=
"relation_subject" (heldout_fraction 0.1, split_seed 0, over relations/factual/*.json).
At each read layer L (residual stream after block L, last subject token):
- linear probe: per-relation multinomial logistic regression fitted on the train subjects,
  scored on the held-out ones (objects unseen in a relation's training set count as wrong;
  "coverage" = share of held-out items whose object the probe could predict at all);
- Patchscope (identity prompt): the activation replaces the residual stream after block L at the
  "?" of "cat -> cat; 1135 -> 1135; hello -> hello; ? ->", greedy continuation up to ";" / newline;
- Patchscope (relation prompt): the same, patched at "x" of the relation's zero-shot template
  with subject "x" ("The capital of x is the city of"), the paper's attribute extraction;
- majority: per relation, the most frequent train object.
All on the held-out items. Prints one table row per layer, the per-relation accuracies, and
the wall times; optionally writes the rows as JSON and the accuracy-vs-layer PNG.

    python benchmarks/relations_baselines.py [--layers 3 6 9 12 15 18 21] [--patchscope-items N]
        [--position subject|last] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine  # noqa: E402
from lit_jax.eval import relations as R  # noqa: E402
from lit_jax.hf import load_pretrained  # noqa: E402


def pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--files", nargs="+", default=list(R.FACTUAL))
    ap.add_argument("--layers", nargs="+", type=int, default=[3, 6, 9, 12, 15, 18, 21])
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patchscope-items", type=int, default=None, help="a seeded subset of held-out items")
    ap.add_argument("--position", choices=R.POSITIONS, default="subject")
    ap.add_argument("--patchscope-prompts", nargs="+", choices=R.PATCHSCOPE_PROMPTS,
                    default=list(R.PATCHSCOPE_PROMPTS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    start = time.perf_counter()
    model = load_pretrained(args.model)
    t_load = time.perf_counter() - start
    items = R.relation_items(files=tuple(args.files), heldout_fraction=args.heldout_fraction, seed=args.seed)
    held = R.heldout(items)
    t0 = time.perf_counter()
    rows = R.relations_by_layer(model.params, model.cfg, model.tokenizer, items, args.layers,
                                batch_size=args.batch_size, patchscope_items=args.patchscope_items, seed=args.seed,
                                position=args.position, patchscope_prompts=tuple(args.patchscope_prompts))
    t_eval = time.perf_counter() - t0
    total = time.perf_counter() - start

    echo = sum(R.object_correct(it.subject, it.object) for it in held)
    kinds = [("patchscope" if k == "identity" else f"patchscope_{k}", k) for k in args.patchscope_prompts]
    print(f"# {args.model} on {machine()}")
    print(f"# {len(items)} items in {len(set(it.relation for it in items))} relations ({', '.join(args.files)}); "
          f"{len(held)} held out (relations_label=relation_subject, heldout_fraction={args.heldout_fraction}, "
          f"seed={args.seed}); activations at the {args.position} token; Patchscope on "
          f"{rows[0][kinds[0][0]]['n'] if kinds else 0} held-out items")
    print(f"# subject-echo control: {echo}/{len(held)} held-out objects are named in the subject itself")
    print()
    print("| layer | probe acc | probe coverage | " + " | ".join(f"Patchscope ({k}) acc" for _, k in kinds)
          + " | majority | probe s | " + " | ".join(f"Patchscope ({k}) s" for _, k in kinds) + " |")
    print("|---:" * (5 + 2 * len(kinds)) + "|")
    for r in rows:
        p = r["probe"]
        ps = [r[key] for key, _ in kinds]
        print(f"| {r['layer']} | {pct(p['accuracy'])} ({sum(p['correct'])}/{p['n']}) | {pct(p['coverage'])} | "
              + " | ".join(f"{pct(x['accuracy'])} ({sum(x['correct'])}/{x['n']})" for x in ps)
              + f" | {pct(r['majority']['accuracy'])} | {r['seconds']['probe']:.1f} | "
              + " | ".join(f"{r['seconds'][key]:.1f}" for key, _ in kinds) + " |")
    print()
    by_id = {it.id: it for it in items}
    if "identity" in args.patchscope_prompts:
        def names_subject(answer, item):
            return bool(R.normalize(answer)) and R.object_correct(item.subject, answer)
        counts = [sum(names_subject(a, by_id[i]) for i, a in zip(r["patchscope"]["ids"], r["patchscope"]["answers"]))
                  for r in rows]
        print("identity Patchscope answers that are (part of) the subject itself: " + ", ".join(
            f"L{r['layer']} {c}/{r['patchscope']['n']}" for r, c in zip(rows, counts)))
    relations = sorted(rows[0]["probe"]["per_relation"])
    for method in ["probe"] + [key for key, _ in kinds]:
        print(f"{method} accuracy per relation (held-out n) by layer:")
        print(f"  {'relation':<26} {'n':>4} " + " ".join(f"{'L' + str(r['layer']):>6}" for r in rows))
        for rel in relations:
            per = [r[method]["per_relation"].get(rel) for r in rows]
            n = per[0]["n"] if per[0] else 0
            print(f"  {rel:<26} {n:>4} " + " ".join(pct(x["accuracy"] if x else None) for x in per))
    mid = rows[len(rows) // 2]
    for key, kind in kinds:
        print(f"\nPatchscope ({kind}) answers at layer {mid['layer']} (first 8): " + "; ".join(
            f"{by_id[i].subject} -> {a!r} (true {by_id[i].object})"
            for i, a in list(zip(mid[key]["ids"], mid[key]["answers"]))[:8]))
    probe_s = sum(r["seconds"]["probe"] for r in rows)
    ps_s = {kind: sum(r["seconds"][key] for r in rows) for key, kind in kinds}
    acts_s = t_eval - probe_s - sum(ps_s.values())
    print(f"\nwall time: total {total:.1f} s = model load {t_load:.1f} s + items {t0 - start - t_load:.1f} s + "
          f"activations (one pass, {len(args.layers)} layers, incl. compiles) {acts_s:.1f} s"
          f" + probes {probe_s:.1f} s" + "".join(f" + Patchscope ({k}) {v:.1f} s" for k, v in ps_s.items())
          + " (Patchscope: one compile per layer and prompt kind included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    if args.plot:
        R.plot_by_layer(rows, args.plot, title=f"{args.model}: relations/factual, held-out subjects")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
