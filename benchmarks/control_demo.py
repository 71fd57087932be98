"""Control demo: steer SmolLM2 through its trained LIT decoder, and measure what changed.

    python benchmarks/control_demo.py --decoder workdirs/smollm2_demo \
        [--controls golden_gate harry_potter] [--methods vectors lora] [--steps 60]

For each control file (../shared/data/latentqa/controls/<name>.json) and method (steering
vectors, or the LatentQA paper's target LoRA): the decoder's loss on the desired answers over
train and held-out prompts before and after, three held-out generations before and after, and
the fraction of the held-out prompts' greedy generations that mention the concept, before and
after. The keyword lists below were fixed before any run; a generation mentions the concept
if it contains any of them (case-insensitive).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KEYWORDS = {
    "golden_gate": ("golden gate", "bridge", "san francisco"),
    "harry_potter": ("harry", "potter", "hogwarts", "wizard", "magic", "spell", "wand", "muggle"),
    "promote_veganism": ("vegan", "plant-based", "plant based", "animal", "meat", "dairy"),
}


def mentions(text: str, keywords) -> bool:
    text = text.lower()
    return any(k in text for k in keywords)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", required=True, help="a `lit` run's work dir")
    ap.add_argument("--controls", nargs="+", default=["golden_gate", "harry_potter"])
    ap.add_argument("--methods", nargs="+", default=["vectors", "lora"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=20, help="held-out prompts generated from (>= 20)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="", help="JSON of every figure and generation (default <decoder>/control_demo.json)")
    args = ap.parse_args()

    from lit_jax.generate import SamplingConfig, chat
    from lit_jax.lit.control import (ControlConfig, optimize_control, read_control_file, read_prompts,
                                     split_prompts)
    from lit_jax.lit.trained import load_decoder

    decoder = load_decoder(args.decoder)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    report = {"decoder": decoder.path, "step": decoder.step, "keywords": KEYWORDS, "runs": []}
    for control in args.controls:
        keywords = KEYWORDS[control]
        ccfg = ControlConfig(file=os.path.join(ROOT, "..", "shared", "data", "latentqa", "controls", f"{control}.json"),
                             prompts=os.path.join(ROOT, "configs", "control_prompts.jsonl"), steps=args.steps,
                             num_heldout=args.heldout)
        qa = read_control_file(ccfg.file)
        train, heldout = split_prompts(read_prompts(ccfg.prompts), ccfg.num_train, ccfg.num_heldout, 0)
        plain = chat(decoder.base, decoder.cfg, decoder.tokenizer, heldout, sampling=sampling)
        for method in args.methods:
            t0 = time.time()
            result = optimize_control(decoder, qa, train, heldout, dataclasses.replace(ccfg, method=method),
                                      progress=False)
            steered = chat(decoder.base, decoder.cfg, decoder.tokenizer, heldout, sampling=sampling,
                           steering=result.steering)
            before = sum(mentions(g, keywords) for g in plain) / len(heldout)
            after = sum(mentions(g, keywords) for g in steered) / len(heldout)
            run = {"control": control, "method": method, "steps": args.steps, "seconds": round(time.time() - t0),
                   "loss": {s: (result.before[s]["answer_loss"], result.after[s]["answer_loss"])
                            for s in ("train", "heldout")},
                   "mention_fraction": (before, after), "heldout_prompts": len(heldout),
                   "generations": [{"prompt": p, "before": b, "after": a}
                                   for p, b, a in zip(heldout, plain, steered)]}
            report["runs"].append(run)
            print(f"\n== {control} / {method} ({run['seconds']} s)")
            for s, (b, a) in run["loss"].items():
                print(f"  decoder loss on the desired answers, {s:8s}: {b:.3f} -> {a:.3f}")
            print(f"  held-out generations mentioning {keywords}: {before:.0%} -> {after:.0%} "
                  f"({len(heldout)} prompts)")
            for g in run["generations"][:3]:
                print(f"  prompt: {g['prompt']}\n    before: {g['before'][:200]}\n    after:  {g['after'][:200]}")
    out = args.out or os.path.join(args.decoder, "control_demo.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
