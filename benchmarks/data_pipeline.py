"""Data pipeline speed and padding waste on the full LatentQA corpus (eval + v0 files joined with qa.json).

    python benchmarks/data_pipeline.py [--repeats 3 --batch 4]

Prints records/s to read + tokenize + batch one epoch (SmolLM2 tokenizer, in memory), the
tfds store's build time and read-back batching speed, and the padding waste (% pad tokens)
with the chosen length buckets versus padding every example to the longest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine  # noqa: E402
from lit_jax.data import (assign_buckets, choose_buckets, default_data_config, make_eval_iterator,  # noqa: E402
                          prepare_examples)
from lit_jax.data.examples import example_lengths  # noqa: E402
from lit_jax.data.pipeline import build_splits, in_memory_sources  # noqa: E402
from lit_jax.hf import load_tokenizer, smollm2_gguf_path  # noqa: E402
from lit_jax.padding import round_up  # noqa: E402


def epoch(sources, cfg) -> list[dict]:
    """Every example once (eval order, last batch per bucket padded)."""
    return [b for s in ("train", "heldout")
            for b in make_eval_iterator(sources[s], cfg, process_index=0, process_count=1)]


def batch_tokens(batches) -> np.ndarray:
    """[real read, padded read, real decoder, padded decoder] token counts over the batches."""
    return np.array([sum(int(b["read_valid"].sum()) for b in batches), sum(b["read_tokens"].size for b in batches),
                     sum(int(b["decoder_valid"].sum()) for b in batches), sum(b["decoder_tokens"].size for b in batches)])


def planned_tokens(splits: list[np.ndarray], buckets, batch: int) -> np.ndarray:
    """The same counts for each split's lengths batched in `buckets` (cheapest first), last batch per bucket padded."""
    return sum(_planned(lengths, buckets, batch) for lengths in splits)


def _planned(lengths: np.ndarray, buckets, batch: int) -> np.ndarray:
    ids = assign_buckets(lengths, buckets)
    rows = np.array([-(-int((ids == k).sum()) // batch) * batch for k in range(len(buckets))])
    shape = np.asarray(buckets)
    return np.array([lengths[:, 0].sum(), rows @ shape[:, 0], lengths[:, 2].sum(), rows @ shape[:, 2]])


def waste(c: np.ndarray, read_weight: float | None = None) -> str:
    """% pad tokens: read / decoder, or one cost-weighted figure (read tokens count read_weight)."""
    if read_weight is None:
        return f"read {100 * (1 - c[0] / c[1]):.1f}%, decoder {100 * (1 - c[2] / c[3]):.1f}%"
    return f"{100 * (1 - (read_weight * c[0] + c[2]) / (read_weight * c[1] + c[3])):.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    tok = load_tokenizer(smollm2_gguf_path())
    cfg = default_data_config()
    cfg.storage, cfg.batch_size = "memory", args.batch
    print(f"machine: {machine()}")

    times, prep_times = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        examples, meta = prepare_examples(cfg, tok)
        t_prep = time.perf_counter()
        sources = in_memory_sources(examples, meta)
        batches = epoch(sources, cfg)
        times.append(time.perf_counter() - t)
        prep_times.append(t_prep - t)
    n_examples = sum(len(v) for v in examples.values())
    n_records = len({(e["source"], int(e["record_index"])) for v in examples.values() for e in v})
    total, prep = statistics.median(times), statistics.median(prep_times)
    print(f"LatentQA corpus: {n_records} records x QA pairs = {n_examples} examples "
          f"({len(examples['train'])} train / {len(examples['heldout'])} held-out), {len(batches)} batches of "
          f"{args.batch}; buckets (R, S, T): {[tuple(b) for b in meta['buckets']]}")
    print(f"read + tokenize + batch (in memory, median of {args.repeats}): {total:.2f} s = "
          f"{n_records / total:,.0f} records/s = {n_examples / total:,.0f} examples/s "
          f"(read + tokenize {prep:.2f} s, batch {total - prep:.3f} s = {len(batches) / (total - prep):,.0f} batches/s)")

    with tempfile.TemporaryDirectory() as d:
        tcfg = cfg.copy_and_resolve_references()
        tcfg.storage, tcfg.tfds_dir = "tfds", d
        t = time.perf_counter()
        stored = build_splits(tcfg, tok)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        n = len(epoch(stored, tcfg))
        t_read = time.perf_counter() - t
        print(f"tfds store: prepare + write array_record {t_build:.2f} s; one epoch of batches read back with "
              f"tfds.data_source {t_read:.2f} s = {n_examples / t_read:,.0f} examples/s ({n} batches)")

    per_split = [example_lengths(examples[s]) for s in ("train", "heldout")]
    lengths = np.concatenate(per_split)
    longest = tuple(int(v) for v in round_up(lengths.max(0), cfg.bucket_multiple))
    w = cfg.bucket_read_weight
    measured, padded_max = batch_tokens(batches), planned_tokens(per_split, (longest,), args.batch)
    assert (measured == planned_tokens(per_split, [tuple(b) for b in meta["buckets"]], args.batch)).all()
    print(f"padding waste, % pad tokens over one epoch (batch {args.batch}, every example once):")
    print(f"  {len(meta['buckets'])} buckets: {waste(measured)}; cost-weighted (read token = {w} decoder token) "
          f"{waste(measured, w)}")
    print(f"  padded to the max {longest}: {waste(padded_max)}; cost-weighted {waste(padded_max, w)}")
    for weight in (w, 1.0):
        print(f"  buckets chosen with read weight {weight}, by number of buckets:")
        for k in range(1, 7):
            c = planned_tokens(per_split, choose_buckets(lengths, k, cfg.bucket_multiple, None, weight), args.batch)
            print(f"    {k}: {waste(c)}; cost-weighted {waste(c, w)}")


if __name__ == "__main__":
    main()
