"""Host memory when loading a safetensors checkpoint whole vs straight into shards (issue 15, item 1).

Writes a random Llama-shaped bf16 checkpoint (default ~1.7 GB: D 2048, 16 layers, vocab 32000,
split over several files with an index), then loads it over a (1, 8, 1) mesh of 8 CPU devices
three ways, each in fresh processes:

  whole     1 process, 8 devices: load_safetensors_dir (the whole model in host numpy), then placed
            leaf by leaf (hf.place_params; what the lit job did before)
  sharded   1 process, 8 devices: load_safetensors_sharded (each device's block read from disk)
  sharded   2 processes x 4 devices (jax.distributed on localhost, as two hosts of a pod): each
  x2 hosts  process reads and holds only its devices' half

Per process it prints the peak anonymous memory (RssAnon, sampled every 5 ms: what the process
allocated, including CPU "device" buffers, which live in host memory) and the kernel's peak RSS
(VmHWM, which also counts the checkpoint's file pages mapped by safetensors: page cache, shared
and reclaimable), both minus what the process held before loading, against the checkpoint's size.
On CPU the devices' buffers are host memory, so a single process holds the whole model either
way; the figure that matters for a pod is the per-host one.

    python benchmarks/sharded_load_rss.py [--layers 16] [--hidden 2048] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORKER = r"""
import os, sys, threading, time, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={local}"
sys.path.insert(0, {root!r})
import jax
if {nproc} > 1:
    jax.distributed.initialize("localhost:{port}", num_processes={nproc}, process_id={pid})

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], status("RssAnon")); time.sleep(0.005)
from lit_jax import sharding as shd
from lit_jax.hf import load_safetensors_dir, load_safetensors_sharded, place_params
mesh = shd.make_mesh((1, 8, 1))
jax.block_until_ready(jax.device_put(1.0))
anon0, hwm0 = status("RssAnon"), status("VmHWM")
peak[0] = anon0
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.time()
if {mode!r} == "whole":
    cfg, params = load_safetensors_dir({path!r}, dtype="bfloat16")
    params = place_params(params, cfg, mesh)
else:
    cfg, params = load_safetensors_sharded({path!r}, mesh, dtype="bfloat16")
jax.block_until_ready(params)
wall = time.time() - t0
stop.set(); t.join()
peak[0] = max(peak[0], status("RssAnon"))
held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
print("RESULT", json.dumps(dict(peak_anon=peak[0] - anon0, peak_rss=status("VmHWM") - hwm0, held=held, wall=wall)))
"""


def write_checkpoint(path: str, layers: int, hidden: int, vocab: int) -> int:
    """A random bf16 Llama checkpoint in HF layout (several files + index); returns its bytes."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from lit_jax.hf.convert import hf_shapes
    from lit_jax.models.config import ModelConfig, to_hf_dict

    heads, kv = hidden // 128, max(1, hidden // 512)
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden,
                      intermediate_size=int(hidden * 2.75), num_layers=layers, num_heads=heads, num_kv_heads=kv,
                      head_dim=128, dtype="bfloat16")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_dict(cfg), f)
    rng = np.random.default_rng(0)
    weight_map, shard, shard_bytes, total, n = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, name))
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for name, shape in hf_shapes(cfg).items():
        x = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        shard[name] = x
        shard_bytes += x.nbytes
        total += x.nbytes
        if shard_bytes > 400e6:
            flush()
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def run(mode: str, path: str, nproc: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(
        root=ROOT, local=8 // nproc, nproc=nproc, pid=pid, port=port, mode=mode, path=path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for pid in range(nproc)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{mode} worker failed:\n{stderr[-3000:]}")
        out.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[7:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", default="", help="write the checkpoint here and keep it (default: a temp dir)")
    args = ap.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    path = args.keep or tmp.name
    size = write_checkpoint(path, args.layers, args.hidden, args.vocab)
    gb = lambda b: b / 1e9  # noqa: E731
    print(f"checkpoint: {gb(size):.2f} GB bf16 ({args.layers} layers, hidden {args.hidden}) in {path}")
    print(f"{'load':<28}{'process':>8}{'peak anon GB':>14}{'x ckpt':>8}{'peak RSS GB':>13}{'holds GB':>10}{'wall s':>8}")
    for label, mode, nproc in (("whole, then placed", "whole", 1), ("sharded, 1 process", "sharded", 1),
                               ("sharded, 2 processes x 4", "sharded", 2)):
        for pid, r in enumerate(run(mode, path, nproc)):
            print(f"{label:<28}{pid:>8}{gb(r['peak_anon']):>14.2f}{r['peak_anon'] / size:>8.2f}"
                  f"{gb(r['peak_rss']):>13.2f}{gb(r['held']):>10.2f}{r['wall']:>8.1f}", flush=True)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
