"""Reading speed on SmolLM2-135M-Instruct: lit_jax's Reader vs the PyTorch LatentQA reference's approach, one run.

Both sides answer the same question about the same reads (layer-15 activations of the user
turn of [system, user] dialogs, written after decoder block 0), greedy, exactly 32 new tokens
per answer (end tokens ignored), with an untrained decoder (LoRA B = 0, identity projection):
- lit_jax: `lit_jax.lit.read.Reader.ask` (target stopped after block 15, write during
  prefill, jitted KV-cache decoding);
- reference: transformers' float32 model of the same weights (exported with export_hf): the
  target with output_hidden_states=True, then `generate(use_cache=False)` with a forward hook
  on decoder layer 0 that overwrites the placeholder positions at every step (no LoRA).
Each timed call goes from reads + questions to decoded answers. Reported: ms per generated
token at batch 1 (median wall time of a whole answer / 32) and questions answered per second
at batch 8; plus lit_jax plain decoding of the same decoder prompts (no read, no write, no
LoRA) for context.

    python benchmarks/reading.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine, median_time  # noqa: E402
from configs import smollm2_demo  # noqa: E402
from lit_jax.data import decoder_prompt, tokenize_read  # noqa: E402
from lit_jax.generate import SamplingConfig, generate_jit  # noqa: E402
from lit_jax.hf import export_hf  # noqa: E402
from lit_jax.lit.config import LitConfig  # noqa: E402
from lit_jax.lit.job import load_model  # noqa: E402
from lit_jax.lit.read import Reader  # noqa: E402
from lit_jax.lit.train_state import init_trainable  # noqa: E402
from lit_jax.padding import pad_batch  # noqa: E402

SYSTEMS = [
    "You are a pirate who loves treasure.", "You are a cheerful kindergarten teacher.",
    "You are a grumpy old wizard.", "You are a terse military commander.",
    "You are a poet who answers in rhyme.", "You are a nervous first-day intern.",
    "You are a sarcastic robot butler.", "You are a wise Buddhist monk.",
]
USERS = [
    "What is the capital of France?", "How do I bake bread?", "Tell me about the moon.",
    "What should I do this weekend?", "Why is the sky blue?", "Can you help me with my homework?",
    "What is your favourite food?", "How do airplanes fly?",
]
QUESTION = "What persona will the assistant adopt?"
LAYER, NEW = 15, 32
NO_EOS = (-1,)  # never produced: every answer runs all NEW steps


class NoStopReader(Reader):
    eos_ids = NO_EOS  # shadows Reader.eos_ids: answers never end early


def reference_ask(hf, tok, data_cfg, fmt, reads, questions, pad_id, eos_ids=None):
    """The reference's reading: hidden states of the target, then hook + generate(use_cache=False).
    eos_ids=None: exactly NEW tokens per answer; else answers stop at these ids."""
    import torch

    long = functools.partial(torch.as_tensor, dtype=torch.long)
    with torch.no_grad():
        ids, valid = pad_batch([r[0] for r in reads], pad_id, side="right", length=max(len(r[0]) for r in reads))
        hidden = hf(input_ids=long(ids), attention_mask=long(valid),
                    output_hidden_states=True).hidden_states[LAYER + 1]  # after block 15 (index 0: embeddings)
        prompts = [decoder_prompt(tok, data_cfg, q, num_slots=len(p), layer=LAYER, fmt=fmt)
                   for (_, p), q in zip(reads, questions)]
        T = max(len(p.tokens) for p in prompts)
        tokens, mask = pad_batch([p.tokens for p in prompts], pad_id, side="left", length=T)
        rows = torch.as_tensor(np.concatenate([np.full(len(p.write_positions), i) for i, p in enumerate(prompts)]))
        cols = torch.as_tensor(np.concatenate([p.write_positions + T - len(p.tokens) for p in prompts]))
        acts = torch.cat([hidden[i, long(r[1])] for i, r in enumerate(reads)])

        def write(module, args, output):  # after block 0; left padding keeps the positions fixed
            h = output[0] if isinstance(output, tuple) else output
            h[rows, cols] = acts.to(h.dtype)
            return output

        handle = hf.model.layers[0].register_forward_hook(write)
        try:
            out = hf.generate(long(tokens), attention_mask=long(mask),
                              max_new_tokens=NEW, do_sample=False, use_cache=False, pad_token_id=pad_id,
                              **({"min_new_tokens": NEW} if eos_ids is None else {"eos_token_id": list(eos_ids)}))
        finally:
            handle.remove()
    assert eos_ids is not None or out.shape[1] == T + NEW
    return tok.batch_decode(out[:, T:], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    config = smollm2_demo.get_config()
    cfg, base, tok = load_model(config.model)
    base = jax.device_put(base)  # resident, as in a `lit` run
    lcfg = LitConfig(read_layers=(LAYER,))
    trainable = init_trainable(jax.random.key(0), cfg, lcfg)
    reader = NoStopReader(base, trainable, cfg, lcfg, tok, config.data, sampling=SamplingConfig(NEW))
    reads = [tokenize_read(tok, [{"role": "system", "content": s}, {"role": "user", "content": u}], read_from_turn=1)
             for s, u in zip(SYSTEMS, USERS)]
    pad_id = reader.pad_id
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = export_hf(jax.device_get(base), cfg, os.path.join(tmp, "smollm2"), tokenizer=tok)
        hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"read spans: {[len(p) for _, p in reads]} activations; question {QUESTION!r}")
    # Same computation? Both sides stopping at the Reader's end tokens, as in normal use.
    stopping = Reader(base, trainable, cfg, lcfg, tok, config.data, sampling=SamplingConfig(NEW))
    ours = stopping.ask(reads, [QUESTION] * 8)
    theirs = reference_ask(hf, tok, config.data, reader.decoder_format, reads, [QUESTION] * 8, pad_id,
                           stopping.eos_ids)
    print(f"answers identical (stopping at end tokens): {sum(a == b for a, b in zip(ours, theirs))}/8; "
          f"first: {ours[0]!r}" + ("" if ours[0] == theirs[0] else f" vs reference {theirs[0]!r}"), flush=True)

    results = {}
    for batch in (1, 8):
        rs, qs = reads[:batch], [QUESTION] * batch
        prompts = [decoder_prompt(tok, config.data, q, num_slots=len(r[1]), layer=LAYER,
                                  fmt=reader.decoder_format).tokens for r, q in zip(rs, qs)]
        p_tokens, p_valid = (jnp.asarray(a) for a in pad_batch(prompts, pad_id, side="right"))

        def plain():
            return jax.block_until_ready(generate_jit(base, p_tokens, p_valid, jax.random.key(0), cfg=cfg,
                                                      sampling=SamplingConfig(NEW), eos_ids=NO_EOS, pad_id=pad_id))

        reference_ask(hf, tok, config.data, reader.decoder_format, rs, qs, pad_id)  # warm-up
        reps = args.repeats if batch == 1 else max(1, args.repeats - 1)
        results[batch] = {
            "lit_jax Reader (jit, KV cache)": median_time(lambda: reader.ask(rs, qs), args.repeats),
            "reference hook + generate(no cache)": median_time(
                lambda: reference_ask(hf, tok, config.data, reader.decoder_format, rs, qs, pad_id), reps, warmup=0),
            "lit_jax plain decoding (context)": median_time(plain, args.repeats),
        }
        for name, t in results[batch].items():
            print(f"  batch {batch} {name:38s} {t:8.3f} s", flush=True)

    print(f"\nSmolLM2-135M-Instruct f32, read layer {LAYER}, write after block 0, greedy, {NEW} new tokens; "
          f"medians of {args.repeats} runs (reference batch 8: {max(1, args.repeats - 1)}); "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':38s} {'batch-1 ms/token':>17s} {'batch-8 questions/s':>20s}")
    for name in results[1]:
        print(f"{name:38s} {1e3 * results[1][name] / NEW:17.1f} {8 / results[8][name]:20.2f}")
    lit, ref = "lit_jax Reader (jit, KV cache)", "reference hook + generate(no cache)"
    print(f"\nlit_jax Reader vs reference: batch-1 latency x{results[1][ref] / results[1][lit]:.2f} lower, "
          f"batch-8 throughput x{results[8][ref] / results[8][lit]:.2f} higher")


if __name__ == "__main__":
    main()
