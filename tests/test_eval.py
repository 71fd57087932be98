"""The evaluation harness: scorers on hand-made cases, controls that change what they claim,
intervals, and the `evaluate` task end to end on a tiny trained decoder."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax import load_decoder
from lit_jax.data import Slots, chains, tokenize_read
from lit_jax.eval import classification as cls
from lit_jax.eval import controls, latentqa, stats
from lit_jax.eval.harness import EvalSettings
from lit_jax.generate import SamplingConfig
from lit_jax.lit.loss import written_vectors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


# ------------------------------------------------------------------ intervals and scorers (no model)

def test_wilson_and_bootstrap_intervals():
    iv = stats.wilson(7, 10)
    assert iv["value"] == 0.7 and 0.39 < iv["low"] < 0.40 and 0.89 < iv["high"] < 0.90  # Wilson (1927) 95%
    assert stats.wilson(0, 10)["low"] == 0.0 and stats.wilson(10, 10)["high"] == 1.0
    r = stats.bootstrap_ratio([1.0, 2.0, 3.0, 6.0], [1, 1, 1, 1])
    assert r["value"] == 3.0 and r["low"] < 3.0 < r["high"] and r["n"] == 4
    assert stats.accuracy([1, 0, 0.5])["value"] == 0.5  # fractional credit -> bootstrap
    assert stats.separated({"low": 0.6, "high": 0.8}, {"low": 0.3, "high": 0.5})
    assert not stats.separated({"low": 0.45, "high": 0.8}, {"low": 0.3, "high": 0.5})
    with pytest.raises(ValueError, match="no examples"):
        stats.accuracy([])


def test_choice_scores_prior_removed_and_ties():
    # Candidate 0 is likely under every read (a generic answer): raw argmax would pick it for
    # every read; with its prior (column mean) removed, each read picks its own answer.
    logp = np.array([[-1.0, -6.0, -6.0], [-1.5, -4.0, -7.0], [-1.5, -7.0, -4.0]])
    assert np.argmax(logp, axis=1).tolist() == [0, 0, 0]
    assert latentqa.choice_scores(logp).tolist() == [1.0, 1.0, 1.0]
    assert latentqa.choice_scores(np.zeros((4, 4))).tolist() == [0.25] * 4  # all tied: chance
    with pytest.raises(ValueError, match="square"):
        latentqa.choice_scores(np.zeros((2, 3)))


def test_groups_have_distinct_labels_and_one_question():
    items = [latentqa.Item((None, None), q, "a", lab, "s") for q, lab in
             [("q1", "A"), ("q1", "A"), ("q1", "B"), ("q1", "C"), ("q2", "D"), ("q2", "E"), ("q1", "D")]]
    groups = latentqa.make_groups(items, 2, same_question=True, seed=0)
    for g in groups:
        assert len({items[i].label for i in g}) == 2 and len({items[i].question for i in g}) == 1
    assert len({i for g in groups for i in g}) == 2 * len(groups)  # each item at most once
    assert len(groups) == 3  # q1: A, B, C, D (+ a second A) -> 2 groups; q2: D, E -> 1


def test_other_label_order_never_keeps_a_label():
    labels = ["a"] * 3 + ["b"] * 2 + ["c", "d", "e"]
    for seed in range(5):
        p = controls.other_label_order(labels, seed)
        assert sorted(p.tolist()) == list(range(len(labels)))
        assert all(labels[i] != labels[j] for i, j in enumerate(p))
    with pytest.raises(ValueError, match="share a label"):
        controls.other_label_order(["a", "a", "a", "b"])


class _ScriptedReader:
    """A stand-in decoder whose log-likelihood of an answer is 0 when the read "is" that answer
    (read id == answer id) and -5 otherwise: the right candidate is known for every read."""

    text_only = False

    def examples(self, reads, questions, answers, layer=None, text_only=False):
        return [{"read": r[0], "answer": a} for r, a in zip(reads, answers)]

    def score_examples(self, examples, batch_size=16):
        from lit_jax.lit.read import ExampleScores

        lp = np.asarray([0.0 if e["read"] == e["answer"] else -5.0 for e in examples], np.float32)
        return ExampleScores(lp, np.ones_like(lp), np.ones_like(lp))


def test_choice_task_on_a_known_answer():
    items = [latentqa.Item((str(i), None), "q", str(i), f"label{i}", "s") for i in range(8)]
    groups = latentqa.make_groups(items, 4, same_question=True, seed=1)
    assert len(groups) == 2
    right = latentqa.choice_task(controls.Variant("trained", _ScriptedReader()), items, groups)
    assert right["accuracy"]["value"] == 1.0 and right["chance"] == 0.25
    # Shuffled: every read is another label's, so no read picks its own answer from its own activations.
    wrong = latentqa.choice_task(controls.Variant("shuffled", _ScriptedReader(), shuffled=True), items, groups)
    assert wrong["accuracy"]["value"] < 1.0


def test_generated_answer_word():
    assert cls.generated_answer("Yes, it is.") == "Yes"
    assert cls.generated_answer("no") == "No"
    assert cls.generated_answer("I think not; nobody knows") is None  # "not"/"nobody" are not "no"
    assert cls.generated_answer("Well... NO. Yes later") == "No"  # the first one counts


def test_settings_refuse_unknown_names():
    with pytest.raises(ValueError, match="evaluate.tasks: unknown"):
        EvalSettings(tasks=("latentqa", "vibes"))
    with pytest.raises(ValueError, match="evaluate.controls: unknown"):
        EvalSettings(controls=("zeros", "mirror"))
    with pytest.raises(ValueError, match="no yes/no task"):
        EvalSettings(classification_datasets=("tense_tense",))
    assert EvalSettings(tasks=["latentqa"]).tasks == ("latentqa",)


# ------------------------------------------------------------------ with a tiny trained decoder

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evaluated")
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        "--config.train.steps=2", "--config.train.checkpoint_every=2", "--config.demo.num_examples=0",
                        "--config.train.eval_examples=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def reader(workdir):
    return load_decoder(str(workdir)).reader(SamplingConfig(max_new_tokens=4))


def test_user_turn_read_is_the_token_before_the_end_of_turn(reader):
    tok = reader.tokenizer
    tokens, positions = cls.user_turn_read(tok, "The capital of France is Paris", num_tokens=1)
    assert tok.decode(tokens[positions]).strip() == "Paris"
    assert tok.convert_ids_to_tokens(int(tokens[positions[0] + 1])) == "<|im_end|>"
    _, three = cls.user_turn_read(tok, "The capital of France is Paris", num_tokens=3)
    assert three.tolist() == list(range(positions[0] - 2, positions[0] + 1))


def test_classification_items_are_balanced(reader):
    from lit_jax.data.config import DEFAULT_DATA_DIR

    items = cls.make_items(reader.tokenizer, DEFAULT_DATA_DIR, ["gmt_cities", "engels_5_hist_fig_ismale"], 8)
    assert len(items) == 16
    for name in ("gmt_cities", "engels_5_hist_fig_ismale"):
        mine = [it for it in items if it.dataset == name]
        assert sum(it.answer == "Yes" for it in mine) == 4  # balanced answers
        assert len({it.question for it in mine}) == 2  # the question and its negation
    with pytest.raises(ValueError, match="no yes/no task"):
        cls.make_items(reader.tokenizer, DEFAULT_DATA_DIR, ["tense_tense"], 4)


def _reads(tok):
    return [tokenize_read(tok, [{"role": "system", "content": s}, {"role": "user", "content": "Hi there!"}],
                          read_from_turn=1) for s in ("You are a pirate.", "You are a cautious accountant.")]


def test_zeros_control_writes_zeros(reader):
    zeros = controls.zeros_reader(reader)
    tokens, positions = _reads(reader.tokenizer)[0]
    read = chains(tokens[None], np.ones((1, len(tokens)), bool))
    slots = Slots(positions[None], np.full((1, len(positions)), reader.lcfg.read_layers[0], np.int32),
                  np.arange(len(positions), dtype=np.int32)[None], np.ones((1, len(positions)), bool))
    real = written_vectors(reader.trainable, reader.base, read, slots, reader.cfg, reader.lcfg)
    zero = written_vectors(zeros.trainable, zeros.base, read, slots, zeros.cfg, zeros.lcfg)
    assert float(jnp.abs(real).max()) > 0 and float(jnp.abs(zero).max()) == 0.0  # identity projection of 0


def test_shuffled_control_reads_another_example(reader):
    reads = _reads(reader.tokenizer)
    v = controls.Variant("shuffled", reader, shuffled=True)
    got = v.reads(reads, ["pirate", "accountant"])
    assert got[0] is reads[1] and got[1] is reads[0]


def test_text_only_control_writes_nothing_and_shows_the_text(reader):
    reads = _reads(reader.tokenizer)
    [ex] = reader.examples(reads[:1], ["Who is it?"], ["A pirate."], text_only=True)
    assert len(ex["read_positions"]) == 0 and len(ex["write_positions"]) == 0
    fmt = reader.decoder_format
    assert fmt.placeholder_id not in ex["decoder_tokens"].tolist()
    assert reader.read_text(reads[0]) in reader.tokenizer.decode(ex["decoder_tokens"])
    [normal] = reader.examples(reads[:1], ["Who is it?"], ["A pirate."])
    assert len(normal["write_positions"]) == len(reads[0][1])
    # Its score does not depend on the activations: the same with the read's activations zeroed.
    a = reader.score_examples([ex]).logprob
    b = controls.zeros_reader(reader).score_examples([ex]).logprob
    np.testing.assert_array_equal(a, b)
    # And generation with text_only runs on the text prompt.
    assert isinstance(reader.ask(reads, ["Who is it?"] * 2, text_only=True)[0], str)


def test_untrained_control_is_the_base_model(reader):
    u = controls.untrained_reader(reader)
    assert all(float(jnp.abs(p["b"]).max()) == 0.0 for p in u.trainable["lora"].values())
    assert float(jnp.abs(reader.trainable["lora"]["q"]["b"]).max()) > 0


def test_score_matches_examples_then_score_examples(reader):
    reads = _reads(reader.tokenizer)
    lp = reader.score(reads, ["Who?", "Who?"], [["A pirate.", "An accountant."], ["A pirate."]])
    ex = reader.examples([reads[0], reads[0], reads[1]], ["Who?"] * 3, ["A pirate.", "An accountant.", "A pirate."])
    s = reader.score_examples(ex, batch_size=2)
    np.testing.assert_allclose(np.concatenate(lp), s.logprob, rtol=1e-5)
    assert (s.tokens > 0).all() and (s.correct <= s.tokens).all()


def test_evaluate_task_end_to_end(workdir, tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/evaluate.py",
                        f"--config.decoder={workdir}", f"--config.out_dir={out}",
                        "--config.evaluate.tasks=('latentqa','hidden_system','classification','relations')",
                        "--config.evaluate.k=2", "--config.evaluate.latentqa_examples=6",
                        "--config.evaluate.per_dataset=4", "--config.evaluate.relation_examples=6",
                        "--config.evaluate.probe_layers=(1,)",
                        "--config.evaluate.classification_datasets=('gmt_cities','gmt_larger_than')"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    for task in ("latentqa", "hidden_system", "classification", "relations"):
        assert set(results["tasks"][task]) >= {"trained", *controls.CONTROLS, "reference"}
    rel = results["tasks"]["relations"]
    assert rel["trained"]["accuracy"]["n"] == 6 and set(rel["baselines"]) == {
        "linear_probe", "patchscope_identity", "patchscope_relation"}
    assert [r["layer"] for r in rel["by_layer"]] == [1, 2]  # probe_layers + the read layer
    assert (out / "relations_by_layer.png").exists() and (out / "classification_by_layer.png").exists()
    assert results["tasks"]["classification"]["unseen"] == ["gmt_cities", "gmt_larger_than"]
    assert results["tasks"]["latentqa"]["reference"]["multiple_choice"] == 0.5
    md = (out / "results.md").read_text()
    assert "| hidden_system | accuracy | text_only |" in md
    assert (out / "controls.png").read_bytes()[:4] == b"\x89PNG"
    assert "hidden_system" in r.stdout


def test_evaluation_on_a_mesh_equals_one_device(workdir):
    """The decoder laid out over 8 devices (fsdp 2 x tensor 4) scores what it scores on one."""
    import jax

    from lit_jax.eval.harness import eval_mesh, evaluate_decoder
    from lit_jax.lit.trained import on_mesh

    settings = EvalSettings(tasks=("latentqa", "relations"), controls=("zeros", "untrained"), k=2,
                            latentqa_examples=4, choice_groups=2, relation_examples=4, probe_layers=(),
                            generate=False)
    one = load_decoder(str(workdir))
    mesh = eval_mesh((1, 2, 4))
    spread = on_mesh(one, mesh)
    assert mesh.size == 8 and len(jax.tree.leaves(spread.base)[0].sharding.device_set) == 8
    a = evaluate_decoder(one, settings, progress=False)["tasks"]
    b = evaluate_decoder(spread, settings, progress=False)["tasks"]
    for task in settings.tasks:
        for variant in ("trained", "zeros", "untrained"):
            for metric, x in a[task][variant].items():
                y = b[task][variant][metric]
                np.testing.assert_allclose(y["value"], x["value"], rtol=1e-4, atol=1e-5, err_msg=f"{task}/{variant}/{metric}")
    assert a["relations"]["baselines"].keys() == b["relations"]["baselines"].keys()


def test_eval_mesh_refuses_more_devices_than_visible():
    from lit_jax.eval.harness import eval_mesh

    assert eval_mesh((1, 1, 1)).size == 1 and eval_mesh((1, 1, -1)).size == 8
    with pytest.raises(ValueError, match=r"--config.mesh.shape=\(1, 4, 4\) needs 16 devices; 8 are visible"):
        eval_mesh((1, 4, 4))
    with pytest.raises(ValueError, match="--config.mesh.shape"):
        eval_mesh((1, 0, 1))
