"""Buckets, the batch contract, per-host sharding, deterministic shuffling and exact resume."""

import itertools
import json

import numpy as np
import pytest

from lit_jax.data import BATCH_FIELDS, choose_buckets, make_batch_iterator, make_eval_iterator
from lit_jax.data.batching import _best_cuts, assign_buckets
from lit_jax.data.pipeline import in_memory_sources


@pytest.fixture(scope="module")
def splits(latentqa_prepared):
    examples, meta, cfg = latentqa_prepared
    return in_memory_sources(examples, meta), meta, cfg


def _ids(batches):
    return [int(i) for b in batches for i in b["example_id"] if i >= 0]


def test_buckets_are_few_and_cover_every_example(splits):
    sources, meta, cfg = splits
    buckets = [tuple(b) for b in meta["buckets"]]
    assert 1 < len(buckets) <= cfg.num_buckets and all(v % 8 == 0 for b in buckets for v in b)
    for src in sources.values():
        assert (src.bucket_ids >= 0).all()
        assert len(np.unique(src.bucket_ids)) > 1
    lengths = np.concatenate([s.lengths for s in sources.values()])
    (one,) = choose_buckets(lengths, 1)
    assert one == tuple(int(-(-m // 8) * 8) for m in lengths.max(0))


@pytest.mark.parametrize("w", [1.0, 0.2])
def test_bucket_cuts_are_optimal_on_small_cases(w):
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 9))
        r, t, c = (np.sort(rng.integers(1, 50, n)), rng.integers(1, 50, n), rng.integers(1, 5, n))
        cost = lambda cuts: sum(c[a:b].sum() * (w * r[a:b].max() + t[a:b].max())  # noqa: E731
                                for a, b in zip([0] + cuts, cuts + [n]))
        best = min(cost(list(cs)) for k in range(3) for cs in itertools.combinations(range(1, n), k))
        assert cost(_best_cuts(r, t, c, 3, w)) == pytest.approx(best)


def test_batches_keep_the_contract(splits):
    sources, meta, cfg = splits
    src = sources["train"]
    it = make_batch_iterator(src, cfg, seed=0, process_index=0, process_count=1)
    seen_shapes = set()
    for b in itertools.islice(it, 40):
        assert list(b) == list(BATCH_FIELDS)
        bsz, r = b["read_tokens"].shape
        s, t = b["read_positions"].shape[1], b["decoder_tokens"].shape[1]
        assert (r, s, t) in [tuple(x) for x in meta["buckets"]] and bsz == cfg.batch_size
        seen_shapes.add((r, s, t))
        for k, dt in [("read_tokens", np.int32), ("read_valid", bool), ("read_positions", np.int32),
                      ("slot_mask", bool), ("decoder_tokens", np.int32), ("decoder_valid", bool),
                      ("write_positions", np.int32), ("loss_mask", bool), ("target_positions", np.int32),
                      ("target_mask", bool), ("read_layer", np.int32), ("example_id", np.int32)]:
            assert b[k].dtype == dt, k
        # The target positions are exactly the loss mask, in order, within the bucket's fixed count.
        p = b["target_positions"].shape[1]
        assert p == src.bucket_targets[src.buckets.index((r, s, t))]
        for row in range(bsz):
            np.testing.assert_array_equal(b["target_positions"][row][b["target_mask"][row]],
                                          np.flatnonzero(b["loss_mask"][row]))
        rows = np.arange(bsz)[:, None]
        assert (b["read_valid"][rows, b["read_positions"]] | ~b["slot_mask"]).all()
        assert (b["decoder_tokens"][rows, b["write_positions"]][b["slot_mask"]] == meta["placeholder_id"]).all()
        assert ((b["decoder_tokens"] == meta["placeholder_id"]).sum(1) == b["slot_mask"].sum(1)).all()
        assert not b["loss_mask"][:, 0].any() and not (b["loss_mask"] & ~b["decoder_valid"]).any()
        assert (b["read_tokens"][~b["read_valid"]] == meta["pad_id"]).all()
        assert (b["decoder_tokens"][~b["decoder_valid"]] == meta["pad_id"]).all()
        for row in range(bsz):  # right padding; example matches its source entry
            ex = src[int(b["example_id"][row])]
            n = len(ex["read_tokens"])
            assert b["read_valid"][row].sum() == n and b["read_valid"][row, :n].all()
            assert np.array_equal(b["decoder_tokens"][row, : len(ex["decoder_tokens"])], ex["decoder_tokens"])
        assert (b["read_layer"] == 15).all()
    assert len(seen_shapes) > 1


def test_eval_sees_every_example_exactly_once_also_across_hosts(splits):
    sources, meta, cfg = splits
    src = sources["heldout"]
    single = list(make_eval_iterator(src, cfg, process_index=0, process_count=1))
    assert sorted(_ids(single)) == list(range(len(src)))
    in_order = [int(i) for k in range(len(src.buckets)) for i in np.flatnonzero(src.bucket_ids == k)]
    assert _ids(single) == in_order  # bucket by bucket, ids ascending
    pad_rows = np.concatenate([b["example_id"] for b in single]) < 0
    assert 0 < pad_rows.sum() < len(meta["buckets"]) * cfg.batch_size
    for b in single:
        dummy = b["example_id"] < 0
        for k in ("read_valid", "slot_mask", "decoder_valid", "loss_mask"):
            assert not b[k][dummy].any()
    hosts = [list(make_eval_iterator(src, cfg, process_index=p, process_count=3)) for p in range(3)]
    assert len({len(h) for h in hosts}) == 1  # same number of steps on every host...
    for step in zip(*hosts):  # ...with the same shape at each step
        assert len({b["decoder_tokens"].shape + b["read_tokens"].shape for b in step}) == 1
    per_host = [_ids(h) for h in hosts]
    assert sorted(sum(per_host, [])) == list(range(len(src)))
    assert not set(per_host[0]) & set(per_host[1])


def test_train_sharding_splits_each_global_batch(splits):
    sources, _, cfg = splits
    src = sources["train"]
    double = cfg.copy_and_resolve_references()
    double.batch_size = 2 * cfg.batch_size  # the 2-host global batch on one host
    whole = make_batch_iterator(src, double, seed=3, process_index=0, process_count=1)
    halves = [make_batch_iterator(src, cfg, seed=3, process_index=p, process_count=2) for p in range(2)]
    for b, h0, h1 in itertools.islice(zip(whole, *halves), 30):
        assert np.array_equal(b["example_id"], np.concatenate([h0["example_id"], h1["example_id"]]))
        assert b["decoder_tokens"].shape[1] == h0["decoder_tokens"].shape[1] == h1["decoder_tokens"].shape[1]
    epoch = list(make_batch_iterator(src, cfg, seed=3, process_index=1, process_count=2, num_epochs=1))
    other = list(make_batch_iterator(src, cfg, seed=3, process_index=0, process_count=2, num_epochs=1))
    assert not set(_ids(epoch)) & set(_ids(other)) and len(epoch) == len(other)
    dropped = len(src) - len(_ids(epoch)) - len(_ids(other))
    assert 0 <= dropped < len(src.buckets) * 2 * cfg.batch_size  # drop_remainder drops < 1 global batch/bucket


def test_shuffle_is_seeded_and_changes_per_epoch(splits):
    sources, _, cfg = splits
    src = sources["heldout"]

    def epoch_ids(seed, epoch, shuffle=True):
        it = make_batch_iterator(src, cfg, seed=seed, shuffle=shuffle, process_index=0, process_count=1)
        it.set_state({**it.get_state(), "epoch": epoch})
        return _ids(itertools.islice(it, it.batches_per_epoch))

    a = epoch_ids(0, 0)
    assert a == epoch_ids(0, 0)  # seeded: the same seed and epoch give the same order
    assert a != epoch_ids(1, 0) and a != epoch_ids(0, 1)  # another seed, another epoch: another order
    assert len(set(a)) == len(a)  # each example at most once per epoch...
    assert 0 <= len(src) - len(a) < len(src.buckets) * cfg.batch_size  # ...and all but < one batch per bucket
    plain = epoch_ids(0, 0, shuffle=False)
    assert plain == epoch_ids(1, 1, shuffle=False) and plain != a  # unshuffled: one order for every seed and epoch


@pytest.mark.parametrize("stop", [3, 17])  # 17 crosses an epoch boundary
def test_resume_gives_the_same_next_batches(splits, stop):
    sources, _, cfg = splits
    src = sources["heldout"]
    cfg = cfg.copy_and_resolve_references()
    cfg.batch_size = 32  # ~16 batches per epoch
    it = make_batch_iterator(src, cfg, seed=5, process_index=0, process_count=1)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = list(itertools.islice(it, 8))
    resumed = make_batch_iterator(src, cfg, seed=5, process_index=0, process_count=1)
    resumed.set_state(state)
    got = list(itertools.islice(resumed, 8))
    for a, b in zip(expected, got, strict=True):
        for k in BATCH_FIELDS:
            assert np.array_equal(a[k], b[k]), k
    assert (stop > it.batches_per_epoch) == (state["epoch"] == 1)
    with pytest.raises(ValueError, match="does not match this iterator.*seed"):
        make_batch_iterator(src, cfg, seed=6, process_index=0, process_count=1).set_state(state)


def test_describe_heldout_example(splits):
    sources, meta, cfg = splits
    src = sources["heldout"]
    b = next(make_eval_iterator(src, cfg, process_index=0, process_count=1))
    eid = int(b["example_id"][1])
    d = src.describe(eid)
    assert d["example_id"] == eid and d["split"] == "heldout"
    assert {"label", "question", "answer", "read", "source", "record_index"} <= set(d)
    loss_tokens = b["decoder_tokens"][1][b["loss_mask"][1]]
    assert loss_tokens[-1] == meta["end_of_turn_id"]
    assert d["label"] not in {ex["label"] for ex in sources["train"].data}
    assert len(d["read"]["dialog"]) >= 1 and d["source"].startswith("latentqa/")
    assert assign_buckets(src.lengths[eid: eid + 1], src.buckets)[0] == src.bucket_ids[eid]


def test_state_resumes_on_another_process_count(splits):
    """The plan depends on the global batch only: a 1-host state resumes on 2 hosts."""
    sources, _, cfg = splits
    src = sources["train"]
    double = cfg.copy_and_resolve_references()
    double.batch_size = 2 * cfg.batch_size
    one = make_batch_iterator(src, double, seed=1, process_index=0, process_count=1)
    for _ in range(5):
        next(one)
    state = one.get_state()
    two = [make_batch_iterator(src, cfg, seed=1, process_index=p, process_count=2) for p in range(2)]
    for it in two:
        it.set_state(state)
    for b, h0, h1 in itertools.islice(zip(one, *two), 4):
        assert np.array_equal(b["example_id"], np.concatenate([h0["example_id"], h1["example_id"]]))


def test_group_by_read_keeps_qa_pairs_of_a_dialog_together(splits):
    sources, meta, cfg = splits
    src = sources["train"]
    assert len(np.unique(src.groups)) < len(src)  # LatentQA: several QA pairs per dialog
    grouped = make_batch_iterator(src, cfg, seed=3, num_epochs=1, process_index=0, process_count=1)
    assert grouped.group_by_read
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.group_by_read = False
    plain = make_batch_iterator(src, cfg2, seed=3, num_epochs=1, process_index=0, process_count=1)
    shared = {}
    for name, it in (("grouped", grouped), ("plain", plain)):
        batches = list(it)
        ids = _ids(batches)
        assert len(ids) == len(set(ids))  # each example at most once per epoch
        shared[name] = np.mean([len(r) - len(np.unique(src.groups[r])) for r in
                                ([i for i in b["example_id"] if i >= 0] for b in batches)])
    assert shared["grouped"] > 1.0 > 0.2 > shared["plain"]  # rows per batch that share a dialog with another
    with pytest.raises(ValueError, match="does not match"):
        plain.set_state(grouped.get_state())
