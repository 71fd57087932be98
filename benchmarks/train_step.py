"""LIT train step on SmolLM2-135M, f32, this CPU: lit_jax vs the PyTorch reference algorithm, one run.

The reference (as the LatentQA code does it): transformers + PEFT LoRA r=16 (alpha 32,
dropout 0.05, on q,k,v,o,gate,up,down and lm_head) on a second model copy, the target's
full forward with a hook capturing block 15's output, replacement at decoder block 0 by a
forward hook, logits and loss over the whole sequence, AdamW.

Both sides train on the same real LatentQA batches (rows with ~60 read and ~120 decoder
tokens; the reference pads them to the batch's longest, rounded to 8; lit_jax packs each
batch into prefix trees as its training loop does, `train.pack`). By default a batch holds
the 2 QA pairs of each of 2 dialogs, as the training iterator groups them
(`data.group_by_read`); `--distinct` takes 4 rows from 4 different dialogs (ungrouped
shuffling), where packing shares only the chat template. Each side runs in its own
process (so peak RSS is its own). The f32 matmul peak is JAX's own: a jitted 2048^3 f32
matmul, measured in its own process before and after the two sides; "% of peak" is
against it. numpy's 2048^3 matmul is printed beside it, measured with OPENBLAS_CORETYPE
and OPENBLAS_L2_SIZE removed from that one process's environment (this environment sets
them, and they hold OpenBLAS to about half the machine's peak). Every process starts with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as `python -m lit_jax.main` does
(lit_jax/cpu_tuning.py); `--no-hugepages` runs them all without it.

    python benchmarks/train_step.py [--steps 6] [--batches 3] [--distinct] [--no-hugepages]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
READ_LAYER, RANK, ALPHA, LR = 15, 16, 32.0, 1e-4
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def build_batches(path: str, n_batches: int, paired: bool, batch: int = 4) -> dict:
    """Real LatentQA rows with 40..80 read and 100..140 decoder tokens, in batches of 4.

    paired: consecutive rows (the 2 QA pairs of each dialog); else one row per dialog.
    """
    from lit_jax.data import default_data_config, prepare_examples
    from lit_jax.data.batching import collate
    from lit_jax.hf import load_tokenizer, smollm2_gguf_path

    tok = load_tokenizer(smollm2_gguf_path())
    cfg = default_data_config()
    cfg.read_layers = (READ_LAYER,)
    examples, meta = prepare_examples(cfg, tok)
    rows = [e for e in examples["train"] if 40 <= len(e["read_tokens"]) <= 80 and 100 <= len(e["decoder_tokens"]) <= 140]
    if not paired:
        seen, distinct = set(), []
        for e in rows:
            if (key := e["read_tokens"].tobytes()) not in seen:
                seen.add(key)
                distinct.append(e)
        rows = distinct
    rows = rows[: n_batches * batch]
    if len(rows) < n_batches * batch:
        raise SystemExit(f"only {len(rows)} rows in the length window")
    up = lambda n: -(-n // 8) * 8  # noqa: E731
    out = {}
    for i in range(n_batches):
        chunk = rows[i * batch:(i + 1) * batch]
        shape = (up(max(len(e["read_tokens"]) for e in chunk)), up(max(len(e["read_positions"]) for e in chunk)),
                 up(max(len(e["decoder_tokens"]) for e in chunk)))
        p = up(max(int(e["loss_mask"].sum()) for e in chunk))
        b = collate(chunk, list(range(batch)), shape, meta["pad_id"], READ_LAYER, p)
        for k, v in b.items():
            out[f"{i}/{k}"] = v
    np.savez(path, **out)
    real_read = np.mean([len(e["read_tokens"]) for e in rows])
    real_dec = np.mean([len(e["decoder_tokens"]) for e in rows])
    return {"rows": len(rows), "mean_read": float(real_read), "mean_decoder": float(real_dec)}


def load_batches(path: str) -> list[dict]:
    z = np.load(path)
    n = len({k.split("/")[0] for k in z.files})
    return [{k.split("/")[1]: z[k] for k in z.files if k.startswith(f"{i}/")} for i in range(n)]


def time_steps(step, batches, steps: int) -> list[float]:
    """Seconds per step after one warm-up step per distinct batch shape."""
    for b in batches:
        step(b)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t)
    return times


MATMUL_N = 2048
OPENBLAS_THROTTLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # dropped for the numpy peak's process only


def matmul_gflops(matmul, repeats: int = 9) -> float:
    """GFLOP/s of `matmul()` (an f32 MATMUL_N^3 product, blocking), median of `repeats` after 2 warm-up calls."""
    matmul(), matmul()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - t)
    return 2 * MATMUL_N**3 / float(np.median(times)) / 1e9


def part_peak() -> dict:
    """The f32 matmul peak as JAX reaches it: a jitted 2048^3 matmul on the default device."""
    import jax

    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.random((MATMUL_N, MATMUL_N), np.float32)) for _ in range(2))
    f = jax.jit(lambda x, y: x @ y)
    return {"peak_gflops": matmul_gflops(lambda: f(a, b).block_until_ready()), "backend": jax.default_backend()}


def part_numpy_peak() -> dict:
    """numpy's (OpenBLAS's) 2048^3 f32 matmul, and the OPENBLAS_* variables this process saw."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((MATMUL_N, MATMUL_N), np.float32) for _ in range(2))
    return {"peak_gflops": matmul_gflops(lambda: a @ b),
            "env": {k: os.environ[k] for k in OPENBLAS_THROTTLES if k in os.environ}}


def part_jax(path: str, steps: int, remat: str, pack: bool = True) -> dict:
    import jax

    from lit_jax import sharding as shd
    from lit_jax.cpu_tuning import CompiledPerShape
    from lit_jax.data import pack_batch, plain_batch
    from lit_jax.hf import load_params
    from lit_jax.lit.config import LitConfig
    from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer
    from lit_jax.lit.train_step import jit_train_step
    from lit_jax.models.lora import LoraConfig

    rows = load_batches(path)
    t = time.perf_counter()
    batches = [(pack_batch if pack else plain_batch)(b) for b in rows]  # LitBatch, on the host
    pack_ms = 1e3 * (time.perf_counter() - t) / len(batches)
    cfg, base = load_params("smollm2", scan_layers=True, remat=remat)
    base = shd.put_consuming(base)
    lcfg = LitConfig(read_layers=(READ_LAYER,), write_layer=0, lora=LoraConfig(rank=RANK, alpha=ALPHA))
    opt = make_optimizer(LR, 0, 1000)
    state = init_state(init_trainable(jax.random.key(0), cfg, lcfg), opt)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    state = jax.device_put(state, shd.placed_like(state, mesh))
    fn = CompiledPerShape(jit_train_step(cfg, lcfg, opt, out_shardings=(shd.placed_like(state, mesh),
                                                                         shd.replicated(mesh))))
    dev = [shd.host_batch_to_global(b, mesh) for b in batches]
    holder = {"state": state}

    def step(b):
        holder["state"], m = fn(holder["state"], base, b)
        jax.block_until_ready(m)

    times = time_steps(step, dev, steps)
    shapes = [{"read": list(b.read.tokens.shape), "decoder": list(b.decoder.tokens.shape),
               "targets": list(b.targets.mask.shape)} for b in batches]
    return {"times": times, "rss_gb": peak_rss_gb(), "remat": remat, "shapes": shapes,
            **({"pack_ms": pack_ms} if pack else {})}


def part_torch(path: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lit_jax.hf import smollm2_gguf_path

    torch.manual_seed(0)
    batches = load_batches(path)
    gguf = smollm2_gguf_path()
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    target = load().eval()
    decoder = get_peft_model(load(), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    decoder.train()
    opt = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=LR)
    t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype)  # noqa: E731

    def step(b):
        captured = {}
        hook = target.model.layers[READ_LAYER].register_forward_hook(
            lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            target(input_ids=t(b["read_tokens"]), attention_mask=t(b["read_valid"]))  # full forward, all logits
        hook.remove()
        rows = torch.arange(b["read_tokens"].shape[0])[:, None]
        acts = captured["h"][rows, t(b["read_positions"])]
        mask, pos = t(b["slot_mask"], torch.bool), t(b["write_positions"])

        def write(m, i, o):
            h = (o[0] if isinstance(o, tuple) else o).clone()
            h[rows.expand_as(pos)[mask], pos[mask]] = acts[mask]
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        layer0 = decoder.base_model.model.model.layers[0]
        hook = layer0.register_forward_hook(write)
        labels = torch.where(t(b["loss_mask"], torch.bool), t(b["decoder_tokens"]), -100)
        out = decoder(input_ids=t(b["decoder_tokens"]), attention_mask=t(b["decoder_valid"]), labels=labels)
        hook.remove()
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    times = time_steps(step, batches, steps)
    return {"times": times, "rss_gb": peak_rss_gb(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--part", choices=["peak", "numpy_peak", "jax", "torch"])
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-pack", dest="pack", action="store_false")
    ap.add_argument("--distinct", action="store_true", help="batches of 4 rows from 4 different dialogs")
    ap.add_argument("--data")
    ap.add_argument("--no-hugepages", dest="hugepages", action="store_false",
                    help="run both sides without glibc.malloc.hugetlb=1 (the CLI sets it)")
    args = ap.parse_args()
    if args.part:
        fn = {"peak": part_peak, "numpy_peak": part_numpy_peak,
              "jax": lambda: part_jax(args.data, args.steps, args.remat, args.pack),
              "torch": lambda: part_torch(args.data, args.steps)}[args.part]
        print("RESULT " + json.dumps(fn()), flush=True)
        return

    from benchmarks.common import machine
    from benchmarks.flops import lit_step_flops
    from lit_jax.cpu_tuning import env_with_hugepages, env_without_hugepages, has_tunable
    from lit_jax.hf import load_params

    data = os.path.join(tempfile.mkdtemp(), "batches.npz")
    info = build_batches(data, args.batches, paired=not args.distinct)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # as `python -m lit_jax.main` runs (lit_jax/cpu_tuning.py), for both sides
    env = env_with_hugepages(env) if args.hugepages else env_without_hugepages(env)
    numpy_env = {k: v for k, v in env.items() if k not in OPENBLAS_THROTTLES}
    results = {}
    runs = [("peak", "peak", []), ("numpy_peak", "numpy_peak", []), ("jax", "jax", ["--remat", "none"]),
            ("torch", "torch", []), ("jax_remat", "jax", ["--remat", "matmuls"]), ("peak2", "peak", []),
            ("numpy_peak2", "numpy_peak", [])]
    for key, part, extra in runs:
        r = subprocess.run([sys.executable, __file__, "--part", part, "--data", data, "--steps", str(args.steps),
                            *extra], capture_output=True, text=True, env=numpy_env if part == "numpy_peak" else env,
                           cwd=ROOT)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"{part} failed:\n{r.stderr[-3000:]}")
        results[key] = json.loads(line[0][7:])

    from lit_jax.data import pack_batch

    cfg, _ = load_params("smollm2")
    batches = load_batches(data)
    packed = [pack_batch(b) for b in batches]
    dec_tokens = np.mean([b["decoder_valid"].sum() for b in batches])
    flops_ours, flops_ref = [], []
    for b, p in zip(batches, packed):
        B, R = b["read_tokens"].shape
        T, P = b["decoder_tokens"].shape[1], b["target_positions"].shape[1]
        ours = lit_step_flops(cfg, batch=p.read.tokens.shape[0], read_len=p.read.tokens.shape[1],
                              dec_len=p.decoder.tokens.shape[1], targets=p.targets.mask.shape[1],
                              read_layer=READ_LAYER, rank=RANK, lora_targets=TARGETS, attention_block=64,
                              attention_recompute=True)
        # the same for remat="matmuls": it keeps every matmul output the backward needs
        # (q|k|v, attention, gate|up, LoRA's x @ A.T) and recomputes only elementwise work
        flops_ours.append(ours["total"])
        flops_ref.append(lit_step_flops(cfg, batch=B, read_len=R, dec_len=T, targets=P, read_layer=READ_LAYER,
                                        rank=RANK, lora_targets=TARGETS, target_layers=cfg.num_layers,
                                        logits_rows_target=B * R, logits_rows_decoder=B * T, lm_head_lora=True
                                        )["total"])
    peak = max(results["peak"]["peak_gflops"], results["peak2"]["peak_gflops"])  # JAX's, not numpy's
    env_openblas = ", ".join(f"{k}={env[k]}" for k in OPENBLAS_THROTTLES if k in env)
    print(f"machine: {machine()}")
    print(f"GLIBC_TUNABLES for both sides: {env.get('GLIBC_TUNABLES', '(unset)')}"
          f"{'' if has_tunable(env) else ' (no huge pages)'}")
    print(f"batches: {args.batches} x 4 real LatentQA rows, {'4 dialogs' if args.distinct else '2 dialogs x 2 QA pairs'}"
          f" each (mean {info['mean_read']:.0f} read / {info['mean_decoder']:.0f} decoder tokens per row)")
    print(f"  reference shapes (B, R, T): {[b['read_tokens'].shape + b['decoder_tokens'].shape[1:] for b in batches]}")
    print(f"  lit_jax packed (rows, read, decoder, targets): "
          f"{[(*p.read.tokens.shape, p.decoder.tokens.shape[1], p.targets.mask.shape[1]) for p in packed]}"
          f"; host packing {results['jax'].get('pack_ms', float('nan')):.1f} ms/batch")
    print(f"  decoder tokens per batch {dec_tokens:.0f}; computed after packing "
          f"{np.mean([p.decoder.valid.sum() for p in packed]):.0f} (+ padding to a multiple of 16)")
    print(f"f32 matmul peak (JAX jit {MATMUL_N}^3, before/after): {results['peak']['peak_gflops']:.0f} / "
          f"{results['peak2']['peak_gflops']:.0f} GFLOP/s; numpy {MATMUL_N}^3 without "
          f"{'/'.join(OPENBLAS_THROTTLES)}: {results['numpy_peak']['peak_gflops']:.0f} / "
          f"{results['numpy_peak2']['peak_gflops']:.0f} GFLOP/s"
          f" ({'the other processes keep ' + env_openblas if env_openblas else 'neither was set'})")
    print(f"\n{'implementation':32s} {'step s (median)':>15s} {'dec tok/s':>10s} {'GFLOP/step':>11s} "
          f"{'% of peak':>9s} {'peak RSS GB':>11s}")
    rows = {}
    for name, key, fl in (("lit_jax (packed)", "jax", flops_ours), ("lit_jax (packed, remat=matmuls)", "jax_remat", flops_ours),
                          ("PyTorch reference", "torch", flops_ref)):
        med = float(np.median(results[key]["times"]))
        gf = float(np.mean(fl)) / 1e9
        rows[key] = (med, dec_tokens / med)
        print(f"{name:32s} {med:15.2f} {dec_tokens / med:10.0f} {gf:11.0f} {100 * gf / med / peak:8.0f}% "
              f"{results[key]['rss_gb']:11.2f}")
    for key in ("jax", "jax_remat"):
        print(f"{key} / reference: decoder tokens/s x{rows[key][1] / rows['torch'][1]:.2f}")
    print("step times s: " + "; ".join(f"{k} {np.round(results[k]['times'], 2).tolist()}"
                                       for k in ("jax", "jax_remat", "torch")))
    print("(% of peak: the matmul FLOPs each implementation executes, see benchmarks/flops.py, over the better "
          "of the two JAX peaks)")


if __name__ == "__main__":
    main()
