"""Prefix-tree packing: each sequence sees exactly its own prefix; loss and gradients equal the unpacked batch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.data import LitBatch, PackedSizes, StepBatches, pack_batch, plain_batch
from lit_jax.data.packing import Trie, bucket_key
from lit_jax.hf import load_params
from lit_jax.lit.config import LitConfig
from lit_jax.lit.loss import lit_loss_sums
from lit_jax.lit.train_state import init_trainable
from lit_jax.models.lora import LoraConfig
from tests.synthetic_batches import make_batch


def shared_batch(seed=0):
    """Synthetic rows where rows 0/1 share their read dialog and decoder prefix up to the question (two QA
    pairs of one dialog), every row shares a 3-token template prefix, rows 2/3 read different layers."""
    b = make_batch(batch=5, read_len=12, slots=3, dec_len=16, seed=seed, read_layer=1)
    for k in ("read_tokens", "read_valid", "read_positions", "slot_mask", "write_positions"):
        b[k][1] = b[k][0]
    b["decoder_tokens"][1, :8] = b["decoder_tokens"][0, :8]
    b["decoder_tokens"][:, :1] = 7  # template prefix before the slots (at 1..)
    b["read_tokens"][:, :3] = b["read_tokens"][0, :3]
    b["read_layer"][2:4] = [0, 0]
    b["decoder_valid"][4], b["read_valid"][4], b["slot_mask"][4], b["loss_mask"][4] = False, False, False, False
    b["target_positions"][4], b["target_mask"][4] = 0, False  # row 4: a dummy (padding) row
    return b


def test_trie_depth_first_layout():
    t = Trie()
    t.insert("abc")
    t.insert("abd")
    t.insert("ae")
    t.insert("f")
    keys, depth, end, paths = t.layout()
    assert keys == list("abcdef") and depth.tolist() == [0, 1, 2, 2, 1, 0]
    assert end.tolist() == [4, 3, 2, 3, 4, 5]
    assert [p.tolist() for p in paths] == [[0, 1, 2], [0, 1, 3], [0, 4], [5]]


def test_pack_batch_structure():
    b = shared_batch()
    p = pack_batch(b, num_rows=1, multiple=8)
    real_dec = int(b["decoder_valid"].sum())
    n_dec = int(p.decoder.valid.sum())
    assert p.decoder_count.tolist() == [real_dec] and n_dec < real_dec - 7  # prefixes merged
    assert int(p.read.valid.sum()) < int(b["read_valid"][:4].sum()) - 12  # rows 0/1 share their read, all a prefix
    assert p.decoder.tokens.shape[1] % 8 == 0 and p.targets.mask.sum() == b["loss_mask"].sum()
    # every target's logit node is its parent: the target is a child of it (one deeper, inside its subtree)
    tm = p.targets.mask[0]
    lp, tgt = p.targets.logit_positions[0][tm], p.targets.tokens[0][tm]
    np.testing.assert_array_equal(tgt, np.concatenate([b["decoder_tokens"][i][b["loss_mask"][i]] for i in range(5)]))
    depth, end, tokens = p.decoder.depth[0], p.decoder.subtree_end[0], p.decoder.tokens[0]
    for at, token in zip(lp, tgt):
        children = [c for c in range(at + 1, end[at] + 1) if depth[c] == depth[at] + 1]
        assert token in tokens[children]
    # written nodes hold the placeholder written there, read the same tokens and carry their example's layer
    sm = p.slots.mask[0]
    assert set(p.slots.layer[0][sm].tolist()) == {0, 1}
    assert sm.sum() == b["slot_mask"][[0, 2, 3]].sum()  # rows 0 and 1 share their slots
    rows = [0, 2, 3]
    written = [b["decoder_tokens"][i][b["write_positions"][i][b["slot_mask"][i]]] for i in rows]
    read = [b["read_tokens"][i][b["read_positions"][i][b["slot_mask"][i]]] for i in rows]
    assert sorted(tokens[p.slots.write_positions[0][sm]].tolist()) == sorted(np.concatenate(written).tolist())
    assert sorted(p.read.tokens[0][p.slots.read_positions[0][sm]].tolist()) == sorted(np.concatenate(read).tolist())
    # padding: zeros, every mask False
    assert not p.decoder.valid[0, n_dec:].any() and not p.slots.mask[0, sm.sum():].any()
    # rows > examples: the extra row is empty
    p2 = pack_batch(b, num_rows=8, multiple=8)
    assert p2.decoder.valid[4:].sum() == 0 and p2.decoder_count.sum() == real_dec


def test_pack_rejects_bad_rows():
    with pytest.raises(ValueError, match="at least one row"):
        pack_batch(shared_batch(), num_rows=0)


def test_step_batches_plain_or_packed():
    b = shared_batch()
    plain = StepBatches(pack=False, num_rows=2)
    plain.presize([b])  # plain rows need no plan
    got, want = plain(b), plain_batch(b)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)
    packed = StepBatches(pack=True, num_rows=2, multiple=8, levels=2)
    look_ahead = [shared_batch(seed) for seed in range(4)]
    packed.presize(look_ahead)
    key = bucket_key(b)
    planned = packed.sizes.levels(key)
    assert 1 <= len(planned) <= 2  # planned before the first step
    for batch in look_ahead:
        p = packed(batch)
        assert isinstance(p, LitBatch) and p.decoder.tokens.shape[0] == 2
        assert p.decoder.tokens.shape[1] in [lv["decoder"] for lv in planned]
        assert p.decoder_count.sum() == batch["decoder_valid"].sum()
    assert packed.sizes.levels(key) == planned  # the planned levels served every batch: no new shape


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama_bias")
    cfg, base = load_params(path)
    return cfg, jax.device_put(base)


@pytest.mark.parametrize("write_layer,write_mode", [(0, "replace"), (1, "add_norm_matched")])
@pytest.mark.parametrize("rows", [1, 2])
def test_packed_loss_and_grads_equal_unpacked(tiny, write_layer, write_mode, rows):
    cfg, base = tiny
    lcfg = LitConfig(read_layers=(0, 1), write_layer=write_layer, write_mode=write_mode, projection="linear",
                     lora=LoraConfig(rank=4, alpha=8.0))
    params = init_trainable(jax.random.key(0), cfg, lcfg)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params)
    b = shared_batch()
    unpacked = jax.tree.map(jnp.asarray, plain_batch(b))
    packed = jax.tree.map(jnp.asarray, pack_batch(b, num_rows=rows, multiple=8))

    def loss(params, batch):
        s = lit_loss_sums(params, base, batch, cfg, lcfg)
        return s.loss, s

    (l1, s1), g1 = jax.value_and_grad(loss, has_aux=True)(params, unpacked)
    (l2, s2), g2 = jax.value_and_grad(loss, has_aux=True)(params, packed)
    assert float(s1.count) == float(s2.count) == b["loss_mask"].sum()
    assert float(s1.tokens) == float(s2.tokens) and float(s1.correct) == float(s2.correct)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-4, atol=1e-6)


def test_packed_sizes_compile_few_shapes():
    sizes = PackedSizes(multiple=16, levels=2)
    needs = [{"decoder": d, "read": r} for d, r in ((100, 40), (300, 20), (120, 50), (310, 30))]
    sizes.plan("a", needs)
    assert sizes("a", {"decoder": 90, "read": 10}) == {"decoder": 128, "read": 64}  # smallest level that fits
    assert sizes("a", {"decoder": 200, "read": 10}) == {"decoder": 320, "read": 32}
    assert sizes("a", {"decoder": 90, "read": 70}) == {"decoder": 320, "read": 80}  # none fits: the largest grows
    assert len(sizes.levels("a")) == 2 and sizes.levels("b") == []
    assert sizes("b", {"decoder": 10, "read": 10}) == {"decoder": 16, "read": 16}  # unplanned bucket: a new level
    b = shared_batch()
    p = pack_batch(b, sizes=lambda need: {k: n + 5 for k, n in need.items()})
    assert p.decoder.tokens.shape[1] == int(p.decoder.valid.sum()) + 5
    with pytest.raises(ValueError, match="below the packed lengths"):
        pack_batch(b, sizes=lambda need: {k: n - 1 for k, n in need.items()})


@pytest.mark.parametrize("attention", ["fused", "dense"])
def test_packed_trees_under_each_attention_implementation(tiny, attention):
    """A packed batch's loss and gradients do not depend on the attention implementation (trees need a mask)."""
    cfg, base = tiny
    lcfg = LitConfig(read_layers=(0, 1), projection="linear", lora=LoraConfig(rank=4, alpha=8.0))
    params = init_trainable(jax.random.key(0), cfg, lcfg)
    packed = jax.tree.map(jnp.asarray, pack_batch(shared_batch(), num_rows=2, multiple=8))

    def grads(c):
        return jax.value_and_grad(lambda p: lit_loss_sums(p, base, packed, c, lcfg).loss)(params)

    (l1, g1), (l2, g2) = grads(cfg.replace(attention="blocked")), grads(cfg.replace(attention=attention))
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
