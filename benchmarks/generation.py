"""Generation speed on SmolLM2-135M-Instruct: lit_jax vs transformers' PyTorch `generate`, one run.

Prefill tokens/s counts real prompt tokens; decode tokens/s counts generated tokens
(batch x steps) over the time beyond prefill: decode = (t[64 new] - t[1 new]) / 63 steps.
Every run generates exactly 64 tokens (end tokens ignored) so both sides do the same work.

    python benchmarks/generation.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine, median_time  # noqa: E402
from lit_jax.generate import SamplingConfig, generate_jit  # noqa: E402
from lit_jax.hf import load_pretrained, smollm2_gguf_path  # noqa: E402
from lit_jax.padding import pad_batch  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "Name three prime numbers.", "What does a compiler do?", "Give me a tip for sleeping well.",
    "Who wrote Hamlet?", "Describe a cat in one sentence.",
]
NEW = 64
NO_EOS = (-1,)  # never produced: every row runs all steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    pre = load_pretrained("smollm2")
    tok = pre.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in QUESTIONS]
    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rows = []
    for batch in (1, 8):
        ps = prompts[:batch]
        n_prompt = sum(len(p) for p in ps)
        tokens, valid = pad_batch(ps, pre.cfg.pad_token_id)
        tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)

        def ours(n):
            out = generate_jit(pre.params, tokens, valid, jax.random.key(0), cfg=pre.cfg,
                                  sampling=SamplingConfig(n), eos_ids=NO_EOS, pad_id=pre.cfg.pad_token_id)
            return jax.block_until_ready(out)

        t1 = median_time(lambda: ours(1), args.repeats)
        tn = median_time(lambda: ours(NEW), args.repeats)
        rows.append(("lit_jax (jit, KV cache)", batch, n_prompt / t1, batch * (NEW - 1) / (tn - t1), tn))

        hf_tokens, hf_valid = pad_batch(ps, pre.cfg.pad_token_id, length=max(len(p) for p in ps))
        ids, mask = torch.tensor(hf_tokens, dtype=torch.long), torch.tensor(hf_valid, dtype=torch.long)
        for use_cache in (True, False):
            def theirs(n):
                with torch.no_grad():
                    return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, use_cache=use_cache, pad_token_id=pre.cfg.pad_token_id)

            reps = args.repeats if use_cache else max(1, args.repeats // 2)
            h1 = median_time(lambda: theirs(1), reps)
            hn = median_time(lambda: theirs(NEW), reps)
            name = f"transformers generate ({'cache' if use_cache else 'no cache'})"
            rows.append((name, batch, n_prompt / h1, batch * (NEW - 1) / (hn - h1), hn))

    print(f"\nSmolLM2-135M-Instruct f32, greedy, {NEW} new tokens; medians of {args.repeats} runs")
    print(f"{'implementation':34s} {'batch':>5s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'total s':>8s}")
    for name, b, pf, dec, total in rows:
        print(f"{name:34s} {b:5d} {pf:14.0f} {dec:13.1f} {total:8.2f}")
    print("\nratios (lit_jax / transformers):")
    for batch in (1, 8):
        ours_row = next(r for r in rows if r[1] == batch and r[0].startswith("lit_jax"))
        for r in rows:
            if r[1] == batch and not r[0].startswith("lit_jax"):
                print(f"  batch {batch} vs {r[0]:34s} prefill x{ours_row[2] / r[2]:.2f}  decode x{ours_row[3] / r[3]:.2f}")


if __name__ == "__main__":
    main()
