"""Compile time and run time of the SmolLM2-135M forward (30 layers), scan_layers on vs off.

    python benchmarks/forward_compile.py [--batch 4 --length 128 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine, median_time  # noqa: E402
from lit_jax.hf import load_params  # noqa: E402
from lit_jax.models import llama  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg0, params = load_params("smollm2")
    params = jax.device_put(params)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0, cfg0.vocab_size)
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M forward (logits), f32, batch {args.batch} x {args.length} tokens")
    print(f"{'scan_layers':12s} {'compile s':>10s} {'run s (median)':>15s} {'tokens/s':>9s}")
    for scan in (True, False):
        cfg = cfg0.replace(scan_layers=scan)
        f = jax.jit(lambda p, t: llama.forward(p, t, cfg).logits)
        t = time.perf_counter()
        compiled = f.lower(params, tokens).compile()
        compile_s = time.perf_counter() - t
        run_s = median_time(lambda: jax.block_until_ready(compiled(params, tokens)), args.repeats)
        print(f"{str(scan):12s} {compile_s:10.2f} {run_s:15.3f} {args.batch * args.length / run_s:9.0f}")


if __name__ == "__main__":
    main()
