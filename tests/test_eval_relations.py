"""Relational-knowledge evaluation (lit_jax/eval/relations.py): scorer, split, activations, probe, Patchscope."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lit_jax.eval.relations as R
from lit_jax.data import build_splits, default_data_config, tokenize_read
from lit_jax.generate import SamplingConfig, generate_tokens
from lit_jax.hf import load_tokenizer, resolve_model_path
from lit_jax.lit.residual_stream import read_residual_stream
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from tests.trace_counter import count_traces

FILES = ("relations/factual/country_language.json", "relations/factual/country_capital_city.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path("smollm2"))


@pytest.fixture(scope="module")
def tiny(tok):
    """A random 3-layer model over SmolLM2's tokenizer: (cfg, params)."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True,
                      eos_token_ids=(int(tok.eos_token_id),), pad_token_id=tok.pad_token_id)
    return cfg, llama.init_params(jax.random.key(0), cfg, std=0.1)


@pytest.fixture(scope="module")
def small_items():
    return R.relation_items(files=FILES, heldout_fraction=0.3, seed=1)


def _item(text, subject, relation="r", obj="o", heldout=False, index=0):
    start = text.index(subject)
    return R.RelationItem(relation=relation, subject=subject, object=obj, text=text,
                          template=text.replace(subject, "{}"),
                          subject_chars=(start, start + len(subject)), question="Which x completes the text?",
                          range_name="x", label=f"relation:{relation}/{subject}", heldout=heldout, source="hand",
                          index=index)


# ------------------------------------------------------------------------------------------ scorer

@pytest.mark.parametrize("generated, obj, expected", [
    ("Tokyo", "Tokyo", True),
    ("tokyo.", "Tokyo", True),
    ("It is the city of Tokyo", "Tokyo", True),
    ("Tokyoites", "Tokyo", False),  # whole words only
    ("Kyoto", "Tokyo", False),
    ("Washington, D.C.", "Washington D.C.", True),  # punctuation is not part of a word
    ("Washington DC", "Washington D.C.", False),  # "d c" vs "dc": not normalised further
    ("Washington", "Washington D.C.", False),  # a partial multi-word object is not accepted
    ("Mexico", "Mexico City", False),  # ... because its first word is often another entity
    ("Mexico City", "Mexico City", True),
    ("the Joker", "The Joker", True),  # leading articles dropped on both sides
    ("Joker", "The Joker", True),
    ("an apple", "Apple", True),
    ("São Paulo", "Sao Paulo", True),  # accents removed
    ("The United States of America", "United States", True),  # whole-word substring
    ("", "Tokyo", False),
    ("piano and guitar", "guitar", True),
    ("pianist", "piano", False),
])
def test_object_correct(generated, obj, expected):
    assert R.object_correct(generated, obj) is expected


def test_normalize_and_bad_object():
    assert R.normalize("  The  Washington D.C.! ") == "washington d c"
    assert R.normalize("A an the theatre") == "theatre"  # repeated leading articles, not "theatre"'s "the"
    with pytest.raises(ValueError, match="empty after normalization"):
        R.object_correct("anything", "!!!")


def test_patchscope_answer_cut():
    assert R.patchscope_answer(" Tokyo; cat -> cat") == "Tokyo"
    assert R.patchscope_answer(" Paris\nhello") == "Paris"
    assert R.patchscope_answer(" New York City") == "New York City"


# ------------------------------------------------------------------------------------------ items and split

def test_split_matches_the_training_pipeline(tok):
    """Held-out items are exactly the held-out examples of the real pipeline (relations_label="relation_subject")."""
    items = R.relation_items(files=("relations/factual/*.json",), heldout_fraction=0.1, seed=0)
    c = default_data_config()
    c.sources, c.relations_label, c.storage = ("relations/factual/*.json",), "relation_subject", "memory"
    c.heldout_fraction, c.split_seed = 0.1, 0
    splits = build_splits(c, tok)
    described = {s: [splits[s].describe(i) for i in range(len(splits[s]))] for s in ("train", "heldout")}
    pipeline_held = {(d["source"], d["record_index"]) for d in described["heldout"]}
    assert pipeline_held == {(it.source, it.index) for it in items if it.heldout}
    assert len(items) == sum(len(v) for v in described.values())
    by_key = {(d["source"], d["record_index"]): d for v in described.values() for d in v}
    for it in items:
        d = by_key[(it.source, it.index)]
        assert (d["label"], d["question"], d["answer"]) == (it.label, it.question, it.object)
        assert d["read"]["text"] == it.text
        assert it.text[slice(*it.subject_chars)] == it.subject
    train_subjects = {(it.relation, it.subject) for it in items if not it.heldout}
    assert not any((it.relation, it.subject) in train_subjects for it in items if it.heldout)


def test_split_over_other_files_and_errors(small_items):
    assert {it.relation for it in small_items} == {"country language", "country capital city"}
    assert 0 < sum(it.heldout for it in small_items) < len(small_items)
    # the split is over the files a run trained on: a different file set, a different split
    wider = R.relation_items(files=FILES[:1], heldout_fraction=0.3, seed=1, split_files=FILES)
    assert [it.heldout for it in wider] == [it.heldout for it in small_items if it.source == FILES[0]]
    with pytest.raises(ValueError, match="not among split_files"):
        R.relation_items(files=FILES, split_files=FILES[:1])
    with pytest.raises(Exception, match="not a relation"):
        R.relation_items(files=("classification/gmt_cities.csv",))


def test_items_from_a_training_config(small_items):
    c = default_data_config()
    c.sources = FILES + ("latentqa/eval/control.json",)  # other families do not change the relation split
    c.relations_label, c.heldout_fraction, c.split_seed = "relation_subject", 0.3, 1
    assert R.relation_items_from_config(c) == small_items
    assert R.relation_items_from_config(c, FILES[1:]) == [it for it in small_items if it.source == FILES[1]]
    c.sources = ("latentqa/eval/control.json",)
    with pytest.raises(ValueError, match="no relation file"):
        R.relation_items_from_config(c)


def test_last_subject_token(tok):
    cases = [("The capital city of Japan is", "Japan", " Japan", 4),
             ("Superman's secret identity is", "Superman", "man", 1),
             ("New York City is part of", "New York City", " City", 2)]
    tokens, at = R.token_positions(tok, [_item(t, s) for t, s, _, _ in cases])
    for (text, subject, piece, index), t, a in zip(cases, tokens, at):
        assert a == index and tok.decode(t[a: a + 1]) == piece
        np.testing.assert_array_equal(t, tokenize_read(tok, text)[0])  # the tokens training reads


# ------------------------------------------------------------------------------------------ activations

def test_subject_activations_equal_a_direct_read(tok, tiny):
    cfg, params = tiny
    items = [_item("The capital city of Japan is", "Japan"), _item("Superman's secret identity is", "Superman"),
             _item("New York City is part of", "New York City"),
             _item("The language used in the Democratic Republic of the Congo is",
                   "the Democratic Republic of the Congo"),
             _item("Kyoto is in the country of", "Kyoto")]
    layers = (2, 0)  # order given, not sorted
    tokens, at = R.token_positions(tok, items)
    assert len({R.round_up(len(t), 8) for t in tokens}) == 2  # two length buckets
    with count_traces() as traces:
        acts = R.subject_activations(params, cfg, tok, items, layers, batch_size=2)
    assert traces["_stream_at"] == 2  # one compile per length bucket, not per batch
    last = R.subject_activations(params, cfg, tok, items, layers, batch_size=2, position="last")
    assert acts.shape == (5, 2, cfg.hidden_size) and acts.dtype == np.float32
    for i, (t, a) in enumerate(zip(tokens, at)):
        direct = np.asarray(read_residual_stream(params, jnp.asarray(t)[None], cfg, layers))  # [2 (sorted), 1, T, D]
        np.testing.assert_allclose(acts[i], direct[::-1, 0, a], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(last[i], direct[::-1, 0, -1], atol=1e-5, rtol=1e-5)
    with count_traces() as traces:
        again = R.subject_activations(params, cfg, tok, items, layers, batch_size=2)
    assert traces["_stream_at"] == 0
    np.testing.assert_array_equal(again, acts)
    with pytest.raises(ValueError, match="outside|inside"):
        R.subject_activations(params, cfg, tok, items, (3,))


# ------------------------------------------------------------------------------------------ linear probe

def test_probe_separable_and_coverage():
    rng = np.random.default_rng(0)
    items, feats = [], []
    centers = {c: rng.normal(size=16) * 4 for c in ("red", "green", "blue", "cyan", "Violet")}
    spec = [("colour", c, h) for c in ("red", "green", "blue") for h in [False] * 6 + [True] * 2]
    spec += [("other", c, h) for c in ("cyan", "Violet") for h in [False] * 5 + [True] * 2]
    for i, (rel, c, h) in enumerate(spec):
        items.append(_item(f"s{i} x", f"s{i}", relation=rel, obj=c, heldout=h, index=i))
        feats.append(centers[c] + rng.normal(size=16) * 0.1)
    out = R.linear_probe(np.asarray(feats), items)
    assert out["accuracy"] == 1.0 and out["coverage"] == 1.0 and out["n"] == 10
    assert out["predicted"][-1] == "violet"  # classes are normalised objects
    assert out["per_relation"]["colour"] == {"n": 6, "accuracy": 1.0, "coverage": 1.0, "classes": 3}
    json.dumps(out)

    # a held-out object never seen in training: wrong and uncovered; one-class and no-train relations
    extra = [_item("u x", "u", relation="colour", obj="magenta", heldout=True, index=100),
             _item("v x", "v", relation="single", obj="a", index=101), _item("w x", "w", relation="single", obj="a",
                                                                             heldout=True, index=102),
             _item("y x", "y", relation="unseen", obj="b", heldout=True, index=103)]
    out = R.linear_probe(np.concatenate([feats, rng.normal(size=(4, 16))]), items + extra)
    assert out["n"] == 13
    assert out["correct"] == [True] * 10 + [False, True, False]
    assert out["covered"] == [True] * 10 + [False, True, False]
    assert out["accuracy"] == pytest.approx(11 / 13) and out["coverage"] == pytest.approx(11 / 13)
    assert out["predicted"][-3:] == [out["predicted"][-3], "a", None] and out["predicted"][-3] != "magenta"
    assert out["per_relation"]["unseen"] == {"n": 1, "accuracy": 0.0, "coverage": 0.0, "classes": 0}
    maj = R.majority_baseline(items + extra)
    assert maj["n"] == 13 and maj["predicted"][-2:] == ["a", None]
    with pytest.raises(ValueError, match="features of shape"):
        R.linear_probe(np.zeros((3, 4)), items)


# ------------------------------------------------------------------------------------------ Patchscope

def test_patch_prompt_position(tok):
    p = R.patch_prompt(tok)
    assert tok.decode(p.tokens[p.position: p.position + 1]) == " ?"
    assert tok.decode(p.tokens[p.position + 1:]) == " ->"
    with pytest.raises(ValueError, match="no placeholder"):
        R.patch_prompt(tok, "cat -> cat")


def test_patchscope_writes_at_the_placeholder(tok, tiny):
    cfg, params = tiny
    p = R.patch_prompt(tok)
    tokens = jnp.asarray(np.broadcast_to(p.tokens, (2, len(p.tokens))))
    vectors = jnp.asarray(np.random.default_rng(0).normal(size=(2, cfg.hidden_size)), jnp.float32)
    layer = 1
    edit = R.patch_edit(vectors, p.position, layer)
    ctx, _ = llama.attention_context(cfg, jnp.ones(tokens.shape, bool))
    x0 = llama.embed(params, tokens)
    plain, _ = llama.run_blocks(x0, params, ctx, cfg, stop=layer + 1)
    patched, _ = llama.run_blocks(x0, params, ctx, cfg, stop=layer + 1, edit=edit)
    np.testing.assert_array_equal(np.asarray(patched[:, p.position]), np.asarray(vectors))  # after block L, at "?"
    others = np.arange(len(p.tokens)) != p.position
    np.testing.assert_array_equal(np.asarray(patched[:, others]), np.asarray(plain[:, others]))

    out = np.asarray(llama.forward(params, tokens, cfg, edit=edit).logits)
    ref = np.asarray(llama.forward(params, tokens, cfg).logits)
    np.testing.assert_array_equal(out[:, : p.position], ref[:, : p.position])  # before "?": untouched
    assert (np.abs(out[:, p.position:] - ref[:, p.position:]).max(axis=-1) > 1e-4).all()  # at and after: changed


def test_patchscope_end_to_end_and_no_recompile(tok, tiny):
    cfg, params = tiny
    p = R.patch_prompt(tok)
    layer = 1
    own = np.asarray(read_residual_stream(params, jnp.asarray(p.tokens)[None], cfg, (layer,)))[0, 0, p.position]
    rng = np.random.default_rng(1)
    vectors = np.stack([own, rng.normal(size=cfg.hidden_size) * 3, own]).astype(np.float32)
    with count_traces() as traces:
        answers = R.patchscope(params, cfg, tok, vectors, layer, max_new_tokens=5, batch_size=2)
    assert traces["_patched_generate"] == 1  # two batches (the last padded), one compile
    # writing the prompt's own activation back changes nothing: the plain model's greedy continuation
    assert answers[0] == answers[2] == _plain_answer(params, cfg, tok, p.tokens, 5)
    with count_traces() as traces:
        assert R.patchscope(params, cfg, tok, vectors, layer, max_new_tokens=5, batch_size=2) == answers
    assert traces["_patched_generate"] == 0
    with pytest.raises(ValueError, match="expected"):
        R.patchscope(params, cfg, tok, vectors[:, :8], layer)


def _plain_answer(params, cfg, tok, tokens, steps):
    t = jnp.asarray(tokens)[None]
    out, n = generate_tokens(params, t, jnp.ones(t.shape, bool), jax.random.key(0), cfg=cfg,
                             sampling=SamplingConfig(max_new_tokens=steps), eos_ids=R.stop_ids(cfg, tok),
                             pad_id=tok.pad_token_id)
    return R.patchscope_answer(tok.decode(np.asarray(out)[0, : int(n[0])].tolist(), skip_special_tokens=True))


def test_relation_prompts_per_row(tok, tiny, small_items):
    """Per-item target prompts of different lengths (left padded): each row patched at its own "x"."""
    cfg, params = tiny
    items = [next(it for it in small_items if it.relation == r) for r in ("country language", "country capital city")]
    prompts = [R.relation_prompt(tok, it) for it in items]
    assert [tok.decode(p.tokens[p.position: p.position + 1]) for p in prompts] == ["x", " x"]
    assert tok.decode(prompts[1].tokens) == "The capital of x is the city of"
    assert len({len(p.tokens) for p in prompts}) == 2
    layer = 1
    own = np.stack([np.asarray(read_residual_stream(params, jnp.asarray(p.tokens)[None], cfg, (layer,)))[0, 0,
                                                                                                          p.position]
                    for p in prompts])
    answers = R.patchscope(params, cfg, tok, own, layer, prompt=prompts, max_new_tokens=4)
    assert answers == [_plain_answer(params, cfg, tok, p.tokens, 4) for p in prompts]
    # a different vector at "x" changes the continuation's first logits; batched equals one by one
    other = np.random.default_rng(2).normal(size=own.shape).astype(np.float32) * 3
    batched = R.patchscope(params, cfg, tok, other, layer, prompt=prompts, max_new_tokens=4)
    assert batched == [R.patchscope(params, cfg, tok, other[i: i + 1], layer, prompt=prompts[i], max_new_tokens=4)[0]
                       for i in range(2)]
    with pytest.raises(ValueError, match="2 prompts for 1 vectors"):
        R.patchscope(params, cfg, tok, other[:1], layer, prompt=prompts)
    with pytest.raises(ValueError, match="no zero-shot template"):
        R.relation_prompt(tok, items[0]._replace(template_zs=""))


# ------------------------------------------------------------------------------------------ decoder, by layer, plot

class FakeReader:
    """Answers with the object for every other read; records what it was asked."""

    def __init__(self, tok, items):
        self.tokenizer, self.data_cfg, self.calls = tok, default_data_config(), []
        self.objects = {it.text: it.object for it in items}

    def ask(self, reads, questions, layer=None, text_only=False):  # answers as text, as Reader.ask
        self.calls.append((reads, questions, layer))
        texts = [self.tokenizer.decode(r[0]) for r in reads]
        return [f"It is {self.objects[t]}." if i % 2 == 0 else "No idea" for i, t in enumerate(texts)]


def test_decoder_relations_reads_and_asks_as_training(tok, small_items):
    reader = FakeReader(tok, small_items)
    held = R.heldout(small_items)
    out = R.decoder_relations(reader, small_items, 15, batch_size=4)
    assert out["n"] == len(held) and out["ids"] == [it.id for it in held]
    assert out["correct"] == [i % 4 % 2 == 0 for i in range(len(held))]
    assert out["questions"] == [it.question for it in held]  # the record's (training) question
    reads = [r for call in reader.calls for r in call[0]]
    assert all(call[2] == 15 and len(call[0]) == 4 for call in reader.calls)  # last batch padded to 4
    for it, (tokens, positions) in zip(held, reads):
        ref_tokens, ref_positions = tokenize_read(tok, it.text)
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_array_equal(positions, ref_positions)
        assert len(positions) == len(tokens)  # every text token is read


def test_relations_by_layer_and_plot(tok, tiny, small_items, tmp_path):
    cfg, params = tiny
    rows = R.relations_by_layer(params, cfg, tok, small_items, (0, 2), readers={2: FakeReader(tok, small_items)},
                                batch_size=8, patchscope_items=3, max_new_tokens=3,
                                patchscope_prompts=("identity", "relation"))
    assert [r["layer"] for r in rows] == [0, 2] and "decoder" not in rows[0] and "decoder" in rows[1]
    n_held = sum(it.heldout for it in small_items)
    assert rows[0]["probe"]["n"] == n_held and rows[1]["decoder"]["n"] == n_held
    assert rows[0]["patchscope"]["n"] == rows[0]["patchscope_relation"]["n"] == 3
    assert rows[0]["patchscope"]["ids"] == rows[1]["patchscope_relation"]["ids"]  # the same seeded subset
    assert set(rows[1]["seconds"]) == {"probe", "patchscope", "patchscope_relation", "decoder"}
    json.dumps(rows)
    path = R.plot_by_layer(rows, str(tmp_path / "by_layer.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
