"""The LIT train step and reading on one GPU, Llama-3-8B-shaped: step time, tokens/s, MFU, peak memory, questions/s.

Run on a GPU host (H100 / H200; jax[cuda] installed, the repository as the working directory):

    python benchmarks/gpu_train_step.py                      # batch 8 x (256 read + 1024 decoder tokens)
    python benchmarks/gpu_train_step.py --decoder-len 2048   # longer rows (fits an H200; on an H100 try --batch 4)
    python benchmarks/gpu_train_step.py --peak-tflops 835    # a GPU not in the peak table below
    python benchmarks/gpu_train_step.py --tiny --peak-tflops 1   # a tiny model, same code path, on CPU in <1 min

What it runs. The model is configs/llama3_8b.py's: the HF_CONFIG shape of
Meta-Llama-3-8B-Instruct (32 blocks, hidden 4096, 32 query / 8 KV heads, MLP 14336, vocab
128256) with random bf16 weights, created on the GPU by one jitted `llama.init_params`
(16 GB; nothing of that size goes through the host); its run options (bf16, scan over
the layers, remat "dots_no_batch", attention "auto": cuDNN flash attention on plain rows)
and its LIT settings (read layer 15, write after block 0, LoRA rank 16 / alpha 32 on
q,k,v,o,gate,up,down, identity projection, AdamW): the step is `jit_train_step` as the
training loop compiles it (train state donated, fixed output shardings), compiled ahead
of the timing. The batch is synthetic but in the pipeline's form (collated rows ->
`plain_batch`, or `pack_batch` with --layout packed): every row `--read-len` real target
tokens of which the last `--slots` are read, `--decoder-len` real decoder tokens with the
slots written at positions 1..slots and the last `--targets` tokens the answer (the loss).
--layout packed packs the whole batch into one prefix-tree row, as the training loop
does on one device (train.pack=True, one packed row per device): such rows need an
arbitrary attention mask, so attention there is XLA's dense masked attention, not the
fused kernel; compare the two layouts with this flag.

Memory (an estimate made without a GPU): remat "dots_no_batch" keeps every matmul output
of each block for the backward, LoRA's full-width (x A^T) B outputs included, about 86K
values per token per block. XLA:CPU's plan of the default step in float32 (abstract
inputs, no weights) has 94 GB of temporaries, so about 47 GB in bf16, plus 16.6 GB of
arguments (the weights): it should fit an 80 GB H100 with XLA_PYTHON_CLIENT_MEM_FRACTION
0.9 (this script's default unless the variable is set). Rows of 2048 decoder tokens need
an H200 or --batch 4; --remat matmuls keeps about half as much, --remat full least. The
compile line prints XLA's plan on the GPU itself before any step runs; running out of
memory ends with a message saying what to shrink.

What it prints.
- machine: device kind, platform, jax/jaxlib versions, the peak bf16 FLOP/s used for MFU
  (PEAK_BF16_TFLOPS by device kind, dense (no sparsity) tensor-core figures; --peak-tflops
  overrides; an unknown device without the override is refused).
- compile: seconds to lower and compile the train step, and XLA's memory plan of it
  (arguments, outputs, temporaries, per device).
- step: the median wall time of --steps steps after --warmup steps (compilation excluded;
  each step ends with block_until_ready on the new state and metrics).
- tokens/s: (target + decoder) tokens per step / median step time; the decoder tokens/s
  beside it. Padding is not counted (the synthetic rows have none).
- model FLOPs/step: `benchmarks.flops.lit_model_flops`: 2 x the multiply-adds the method
  needs: the target forward through blocks 0..15 (no head), the decoder forward through
  all blocks with LoRA and its vocabulary projection at the answer positions, the decoder
  backward (activation gradients through the frozen weights, LoRA gradients, attention
  backward 2x its forward); causal attention counts its lower triangle. Not counted:
  remat and flash-attention recomputation, a layout's extra work (a packed row's dense
  attention), elementwise work, the optimizer.
- MFU: model FLOPs per step / (median step time x peak bf16 FLOP/s). The issue's target is
  >= 50% on an H100/H200; the script only reports.
- peak GPU memory: the device's memory_stats()["peak_bytes_in_use"] after the train steps
  and again after reading (n/a where the backend has no memory stats, e.g. CPU).
- reading: questions/s answering --read-batch reads (32) x --new-tokens (32) greedy new
  tokens each, with `lit_jax.lit.read.answer_tokens`, the jitted function `Reader.ask`
  runs (target to the read layer, write during prefill, KV-cache decoding), end tokens
  ignored so every answer has all new tokens; decoder prompts of slots + --question-len
  tokens; median of --read-repeats calls after one compiling call.
- RESULT {json}: the same figures, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __name__ == "__main__":  # before JAX starts; JAX takes 75% of GPU memory by default, the launchers 0.9
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # (launch/common.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.flops import lit_model_flops  # noqa: E402
from configs import llama3_8b  # noqa: E402
from lit_jax import sharding as shd  # noqa: E402
from lit_jax.data import Slots, chains, pack_batch, plain_batch  # noqa: E402
from lit_jax.data.batching import target_positions  # noqa: E402
from lit_jax.generate import SamplingConfig  # noqa: E402
from lit_jax.lit.read import answer_tokens  # noqa: E402
from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer  # noqa: E402
from lit_jax.lit.train_step import jit_train_step  # noqa: E402
from lit_jax.models import llama  # noqa: E402
from lit_jax.models.config import REMAT_POLICIES, from_hf_dict  # noqa: E402
from lit_jax.settings import lit_from_section, model_run_options, train_from_config  # noqa: E402

# Peak dense bf16 tensor-core FLOP/s (TFLOP/s, without sparsity) by device kind: (name, test, TFLOP/s).
# jax's device_kind is e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB". NVL variants (H100 NVL, H200 NVL) have other peaks and are not listed.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", lambda k: "H100" in k and "PCIE" in k, 756.0),
    ("H100 SXM", lambda k: "H100" in k and ("SXM" in k or "HBM3" in k) and "PCIE" not in k, 989.0),
    ("H200", lambda k: "H200" in k, 989.0),
    ("A100", lambda k: "A100" in k, 312.0),
)
NO_EOS = (-1,)  # an id never generated: every answer runs all new tokens

# default sizes (each a flag): the Llama-3-8B run, and --tiny
SIZES = {
    "llama3_8b": dict(batch=8, read_len=256, slots=64, decoder_len=1024, targets=128, read_batch=32, new_tokens=32,
                      question_len=32),
    "tiny": dict(batch=2, read_len=32, slots=8, decoder_len=64, targets=16, read_batch=32, new_tokens=32,
                 question_len=16),
}
# --tiny: a small Llama of the same architecture (same code path); read layer 1 of its 4 blocks
TINY_HF_CONFIG = {**llama3_8b.HF_CONFIG, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "bos_token_id": 1, "eos_token_id": [2]}
TINY_READ_LAYER = 1


def peak_flops(device_kind: str, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak bf16 FLOP/s, where it comes from) for a device kind; `override_tflops` (TFLOP/s) wins.

    Raises ValueError for a device kind not in PEAK_BF16_TFLOPS when no override is given,
    and for an override that is not positive.
    """
    if override_tflops is not None:
        if not override_tflops > 0:
            raise ValueError(f"--peak-tflops={override_tflops}: must be positive")
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    kind = device_kind.upper()
    if "NVL" not in kind:
        for name, matches, tflops in PEAK_BF16_TFLOPS:
            if matches(kind):
                return tflops * 1e12, f"{name}, {tflops:g} TFLOP/s dense bf16"
    known = ", ".join(f"{name} {tflops:g}" for name, _, tflops in PEAK_BF16_TFLOPS)
    raise ValueError(f"no peak bf16 FLOP/s known for device kind {device_kind!r} (known, TFLOP/s: {known}); "
                     f"give the device's dense bf16 peak with --peak-tflops TFLOPS to compute MFU")


def setup(tiny: bool, remat: str | None, attention: str | None):
    """(model config, LitConfig, TrainConfig) from configs/llama3_8b.py (the tiny shape with --tiny)."""
    config = llama3_8b.get_config()
    run = model_run_options(config.model)
    run.update({k: v for k, v in (("remat", remat), ("attention", attention)) if v is not None})
    cfg = from_hf_dict(TINY_HF_CONFIG if tiny else llama3_8b.HF_CONFIG, source="configs/llama3_8b.py", **run)
    read_layers = (TINY_READ_LAYER,) if tiny else tuple(config.data.read_layers)
    return cfg, lit_from_section(config.lit, read_layers), train_from_config(config)


def synthetic_rows(*, batch: int, read_len: int, slots: int, decoder_len: int, targets: int, vocab: int,
                   read_layer: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Collated rows (data/batching.py `collate`'s fields), every token real: the last `slots` read tokens are
    read and written at decoder positions 1..slots; the last `targets` decoder tokens are the answer."""
    if not 0 < slots <= read_len:
        raise ValueError(f"--slots {slots}: must be in 1..--read-len ({read_len})")
    if not 0 < targets or 1 + slots + targets > decoder_len:
        raise ValueError(f"--decoder-len {decoder_len} must hold 1 + slots ({slots}) + targets ({targets}) tokens")
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((batch, decoder_len), bool)
    loss_mask[:, decoder_len - targets:] = True
    rows = {
        "read_tokens": rng.integers(3, vocab, (batch, read_len)).astype(np.int32),
        "read_valid": np.ones((batch, read_len), bool),
        "read_positions": np.broadcast_to(np.arange(read_len - slots, read_len, dtype=np.int32), (batch, slots)).copy(),
        "slot_mask": np.ones((batch, slots), bool),
        "decoder_tokens": rng.integers(3, vocab, (batch, decoder_len)).astype(np.int32),
        "decoder_valid": np.ones((batch, decoder_len), bool),
        "write_positions": np.broadcast_to(np.arange(1, slots + 1, dtype=np.int32), (batch, slots)).copy(),
        "loss_mask": loss_mask,
        "read_layer": np.full((batch,), read_layer, np.int32),
        "example_id": np.arange(batch, dtype=np.int32),
    }
    rows["target_positions"], rows["target_mask"] = target_positions(loss_mask, targets)
    return rows


def peak_memory_gb(device) -> float | None:
    """The device's peak bytes in use so far (GB), or None where the backend keeps no memory stats."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise or return None
        return None
    peak = (stats or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def memory_plan_gb(compiled) -> dict[str, float] | None:
    """XLA's memory analysis of a compiled executable, GB per device (None where unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "aliased": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes"}
    return {k: getattr(m, f) / 1e9 for k, f in fields.items() if hasattr(m, f)}


def make_base(cfg, seed: int = 0):
    """Random weights created on the default device by one jitted init (never materialised on the host)."""
    init = jax.jit(llama.init_params, static_argnames=("cfg",))
    return jax.block_until_ready(init(jax.random.key(seed), cfg=cfg))


def time_train(cfg, lcfg, tcfg, base, rows, layout: str, warmup: int, steps: int) -> dict:
    """Compiles the train step for this batch, runs `warmup` then `steps` timed steps; seconds and state."""
    device = jax.devices()[0]
    mesh = shd.make_mesh((1, 1, 1), devices=[device])
    host = plain_batch(rows) if layout == "plain" else pack_batch(rows, num_rows=1)
    batch = shd.host_batch_to_global(host, mesh)
    opt = make_optimizer(tcfg.lr, tcfg.warmup_steps, tcfg.steps, weight_decay=tcfg.weight_decay,
                         clip_norm=tcfg.clip_norm)
    state = init_state(init_trainable(jax.random.key(tcfg.seed), cfg, lcfg), opt)
    state_sharding = shd.placed_like(state, mesh)
    state = jax.device_put(state, state_sharding)
    t = time.perf_counter()
    compiled = jit_train_step(cfg, lcfg, opt, tcfg.accum_steps,
                              out_shardings=(state_sharding, shd.replicated(mesh))).lower(state, base, batch).compile()
    compile_s = time.perf_counter() - t
    times, metrics = [], None
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, base, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"state": state, "times": times, "compile_s": compile_s, "plan": memory_plan_gb(compiled),
            "loss": float(metrics["loss"]), "shapes": {"read": list(host.read.tokens.shape),
                                                       "decoder": list(host.decoder.tokens.shape)}}


def time_reading(cfg, lcfg, trainable, base, *, read_batch: int, read_len: int, slots: int, question_len: int,
                 new_tokens: int, repeats: int, read_layer: int, seed: int = 1) -> dict:
    """Seconds per `answer_tokens` call (what Reader.ask runs) on `read_batch` synthetic reads, after a compiling call."""
    rng = np.random.default_rng(seed)
    B, T = read_batch, slots + question_len
    read = chains(rng.integers(3, cfg.vocab_size, (B, read_len)).astype(np.int32), np.ones((B, read_len), bool))
    slot = Slots(np.broadcast_to(np.arange(read_len - slots, read_len, dtype=np.int32), (B, slots)).copy(),
                 np.full((B, slots), read_layer, np.int32),
                 np.broadcast_to(np.arange(1, slots + 1, dtype=np.int32), (B, slots)).copy(),
                 np.ones((B, slots), bool))
    prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32))
    valid = jnp.ones((B, T), bool)
    sampling = SamplingConfig(new_tokens)

    def ask():
        out, lengths = answer_tokens(trainable, base, read, slot, prompt, valid, jax.random.key(0), cfg=cfg,
                                     lcfg=lcfg, sampling=sampling, eos_ids=NO_EOS, pad_id=0)
        out, lengths = jax.block_until_ready((out, lengths))
        return out, lengths

    t = time.perf_counter()
    out, lengths = ask()
    first_s = time.perf_counter() - t
    if out.shape != (B, new_tokens) or int(jnp.min(lengths)) != new_tokens:
        raise RuntimeError(f"reading generated {out.shape} tokens, lengths {np.asarray(lengths)}; "
                           f"expected {new_tokens} new tokens per read")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ask()
        times.append(time.perf_counter() - t)
    return {"times": times, "first_call_s": first_s}


def fmt_gb(x: float | None) -> str:
    return "n/a (no memory stats on this backend)" if x is None else f"{x:.2f} GB"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU smoke run)")
    ap.add_argument("--batch", type=int, help="rows per step (default 8; tiny 2)")
    ap.add_argument("--read-len", type=int, help="target (read) tokens per row (default 256; tiny 32)")
    ap.add_argument("--slots", type=int, help="activations read and written per row (default 64; tiny 8)")
    ap.add_argument("--decoder-len", type=int, help="decoder tokens per row (default 1024; tiny 64)")
    ap.add_argument("--targets", type=int, help="answer (loss) tokens per row (default 128; tiny 16)")
    ap.add_argument("--layout", choices=("plain", "packed"), default="plain",
                    help="plain rows (fused causal attention) or the batch packed into one prefix-tree row")
    ap.add_argument("--remat", choices=REMAT_POLICIES, help="override configs/llama3_8b.py's remat policy")
    ap.add_argument("--attention", choices=("auto", "blocked", "fused", "dense"),
                    help="override the attention implementation (default: the config's, auto)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak in TFLOP/s (overrides the table)")
    ap.add_argument("--read-batch", type=int, help="reads answered per reading call (default 32)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per answer (default 32)")
    ap.add_argument("--question-len", type=int, help="decoder prompt tokens besides the slots (default 32; tiny 16)")
    ap.add_argument("--read-repeats", type=int, default=3, help="timed reading calls (the median is reported)")
    ap.add_argument("--no-reading", dest="reading", action="store_false", help="skip the reading measurement")
    args = ap.parse_args(argv)
    sizes = {k: (v if getattr(args, k) is None else getattr(args, k))
             for k, v in SIZES["tiny" if args.tiny else "llama3_8b"].items()}
    if args.steps < 1 or args.warmup < 0 or args.read_repeats < 1:
        ap.error("--steps and --read-repeats must be >= 1, --warmup >= 0")

    device = jax.devices()[0]
    try:  # before anything heavy: an unknown GPU without --peak-tflops stops here
        peak, peak_from = peak_flops(device.device_kind, args.peak_tflops)
    except ValueError as e:
        sys.exit(f"gpu_train_step.py: {e}")
    import jaxlib

    print(f"machine: {device.device_kind} ({device.platform}), {jax.device_count()} device(s) visible, using 1; "
          f"jax {jax.__version__}, jaxlib {jaxlib.__version__}; peak {peak / 1e12:g} TFLOP/s ({peak_from})",
          flush=True)

    cfg, lcfg, tcfg = setup(args.tiny, args.remat, args.attention)
    read_layer = lcfg.read_layers[0]
    t = time.perf_counter()
    base = make_base(cfg)
    n_params = llama.num_params(base)
    print(f"model: {'tiny Llama' if args.tiny else 'Llama-3-8B shape'} ({cfg.num_layers} blocks, hidden "
          f"{cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, MLP {cfg.intermediate_size}, vocab "
          f"{cfg.vocab_size}), {n_params / 1e9:.2f} B ({n_params:,}) random {cfg.dtype} params made on device in "
          f"{time.perf_counter() - t:.1f} s; scan_layers={cfg.scan_layers}, remat={cfg.remat}, "
          f"attention={cfg.attention}", flush=True)
    lora = lcfg.lora
    print(f"LIT: read layer {read_layer}, write after block {lcfg.write_layer} ({lcfg.write_mode}), projection "
          f"{lcfg.projection}, LoRA rank {lora.rank} alpha {lora.alpha:g} on {','.join(lora.targets)}", flush=True)
    B, R, S, T, P = (sizes[k] for k in ("batch", "read_len", "slots", "decoder_len", "targets"))
    rows = synthetic_rows(batch=B, read_len=R, slots=S, decoder_len=T, targets=P, vocab=cfg.vocab_size,
                          read_layer=read_layer)
    tokens = B * (R + T)
    print(f"batch: {B} rows x ({R} read + {T} decoder tokens), {S} slots and {P} answer tokens per row; "
          f"{tokens} tokens per step; layout {args.layout}", flush=True)

    try:
        train = time_train(cfg, lcfg, tcfg, base, rows, args.layout, args.warmup, args.steps)
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError, by version
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        sys.exit(f"gpu_train_step.py: the train step ran out of device memory ({str(e).splitlines()[0][:300]}); "
                 f"try a smaller --batch or --decoder-len, or --remat full (least memory), or --remat matmuls")
    mem_train = peak_memory_gb(device)
    plan = train["plan"]
    print(f"compile: train step {train['compile_s']:.1f} s; step arrays (rows, length) read "
          f"{train['shapes']['read']}, decoder {train['shapes']['decoder']}; XLA memory plan: "
          + (", ".join(f"{k} {v:.3g} GB" for k, v in plan.items()) if plan else "n/a"), flush=True)
    step_s = statistics.median(train["times"])
    flops = lit_model_flops(cfg, batch=B, read_len=R, dec_len=T, targets=P, read_layer=read_layer, rank=lora.rank,
                            lora_targets=lora.targets)
    mfu = flops["total"] / (step_s * peak)
    print(f"step: median {1e3 * step_s:.1f} ms over {args.steps} steps after {args.warmup} warm-up (min "
          f"{1e3 * min(train['times']):.1f}, max {1e3 * max(train['times']):.1f} ms); loss {train['loss']:.3f}")
    print(f"tokens/s: {tokens / step_s:,.0f} (target + decoder); decoder {B * T / step_s:,.0f}")
    print(f"model FLOPs/step: {flops['total'] / 1e12:.4g} TFLOP (target forward {flops['target'] / 1e12:.4g}, "
          f"decoder forward {flops['decoder_fwd'] / 1e12:.4g}, decoder backward {flops['decoder_bwd'] / 1e12:.4g}); "
          f"achieved {flops['total'] / step_s / 1e12:.4g} TFLOP/s")
    print(f"MFU: {100 * mfu:.2f}% of {peak / 1e12:g} TFLOP/s")
    print(f"peak device memory after training: {fmt_gb(mem_train)}", flush=True)

    result = {"device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "tiny": args.tiny, "layout": args.layout, "remat": cfg.remat, "attention": cfg.attention,
              "batch": B, "read_len": R, "slots": S, "decoder_len": T, "targets": P, "params": n_params,
              "compile_s": train["compile_s"], "step_s": step_s, "step_times_s": train["times"],
              "tokens_per_s": tokens / step_s, "decoder_tokens_per_s": B * T / step_s,
              "model_flops": flops["total"], "peak_flops": peak, "mfu": mfu, "peak_memory_gb": mem_train,
              "xla_memory_plan_gb": plan, "loss": train["loss"]}
    if args.reading:
        n, new = sizes["read_batch"], sizes["new_tokens"]
        reading = time_reading(cfg, lcfg, train["state"].params, base, read_batch=n, read_len=R, slots=S,
                               question_len=sizes["question_len"], new_tokens=new, repeats=args.read_repeats,
                               read_layer=read_layer)
        read_s = statistics.median(reading["times"])
        mem_read = peak_memory_gb(device)
        print(f"reading: {n} reads ({R} tokens, {S} slots) x {new} new tokens, prompt {S + sizes['question_len']} "
              f"tokens: median {read_s:.3f} s per call over {args.read_repeats} (first call, compiling: "
              f"{reading['first_call_s']:.1f} s) -> {n / read_s:.2f} questions/s, {n * new / read_s:,.0f} new tokens/s")
        print(f"peak device memory after reading: {fmt_gb(mem_read)}")
        result.update(read_batch=n, new_tokens=new, read_s=read_s, questions_per_s=n / read_s,
                      read_first_call_s=reading["first_call_s"], peak_memory_after_reading_gb=mem_read)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
