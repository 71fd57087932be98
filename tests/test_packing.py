"""Prefix-tree packing: each sequence sees exactly its own prefix; loss and gradients equal the unpacked batch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.data.packing import PackedSizes, Trie, pack_batch
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
    p = pack_batch(b, rows=1, multiple=8)
    real_dec = int(b["decoder_valid"].sum())
    n_dec = int(p["decoder_valid"].sum())
    assert p["decoder_count"].tolist() == [real_dec] and n_dec < real_dec - 7  # prefixes merged
    assert p["decoder_tokens"].shape[1] % 8 == 0 and p["target_mask"].sum() == b["loss_mask"].sum()
    # every target's logit node is its parent: depth one less, and the target's ancestors are visible from it
    lp = p["logit_positions"][0][p["target_mask"][0]]
    assert (p["decoder_end"][0][lp] >= lp).all()
    # written nodes are placeholders of the same token and carry their example's layer
    sm = p["slot_mask"][0]
    assert set(p["slot_layer"][0][sm].tolist()) == {0, 1}
    assert sm.sum() == b["slot_mask"][[0, 2, 3]].sum()  # rows 0 and 1 share their slots
    # rows > examples: the extra row is empty
    p2 = pack_batch(b, rows=8, multiple=8)
    assert p2["decoder_valid"][4:].sum() == 0 and p2["decoder_count"].sum() == real_dec


def test_pack_rejects_bad_rows():
    with pytest.raises(ValueError, match="at least one row"):
        pack_batch(shared_batch(), rows=0)


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
    packed = pack_batch(b, rows=rows, multiple=8)

    def loss(params, batch):
        s = lit_loss_sums(params, base, batch, cfg, lcfg)
        return s.loss, s

    unpacked = {k: jnp.asarray(v) for k, v in b.items() if k not in ("loss_mask", "example_id")}
    (l1, s1), g1 = jax.value_and_grad(loss, has_aux=True)(params, unpacked)
    (l2, s2), g2 = jax.value_and_grad(loss, has_aux=True)(params, {k: jnp.asarray(v) for k, v in packed.items()})
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
    assert sizes.shapes() == 2
    assert sizes("b", {"decoder": 10, "read": 10}) == {"decoder": 16, "read": 16}  # unplanned bucket: a new level
    b = shared_batch()
    p = pack_batch(b, sizes=lambda need: {k: n + 5 for k, n in need.items()})
    assert p["decoder_tokens"].shape[1] == int(p["decoder_valid"].sum()) + 5
    with pytest.raises(ValueError, match="below the packed lengths"):
        pack_batch(b, sizes=lambda need: {k: n - 1 for k, n in need.items()})
