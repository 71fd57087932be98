"""A decoder trained by the `lit` job, loaded in this process from its work dir, and read with.

The tiny config (random 4-layer model over SmolLM2's tokenizer) trains for 4 steps in a
subprocess, as a user's run would; everything here loads what that run saved.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax import load_decoder
from lit_jax.data import Slots, chains, plain_batch, tokenize_read
from lit_jax.data.batching import collate
from lit_jax.generate import SamplingConfig
from lit_jax.hf import export_hf
from lit_jax.lit.loss import decoder_weights, lit_loss_sums, written_vectors
from lit_jax.lit.read import each_token, segment
from lit_jax.lit.residual_stream import ResidualWrite, write_edit
from lit_jax.lit.trained import DecoderMismatchError
from lit_jax.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
DIALOGS = [
    [{"role": "system", "content": "You are a pirate who loves the sea."}, {"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are a cautious accountant."}, {"role": "user", "content": "What now?"}],
    [{"role": "user", "content": "Tell me about mountains and rivers."}],
]
QUESTIONS = ["What persona will the assistant adopt?", "How will the assistant answer?", "What is the topic?"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                        "--config.train.steps=4", "--config.train.checkpoint_every=2", "--config.demo.num_examples=0",
                        "--config.train.eval_examples=4", f"--config.export.hf_dir={workdir}/export",
                        f"--config.export.peft_dir={workdir}/peft"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def decoder(workdir):
    return load_decoder(str(workdir))


@pytest.fixture(scope="module")
def reader(decoder):
    return decoder.reader(SamplingConfig(max_new_tokens=6))


def _reads(tok):
    return [tokenize_read(tok, d, read_from_turn=1 if d[0]["role"] == "system" else 0) for d in DIALOGS]


def test_load_latest_and_given_step(workdir, decoder):
    assert decoder.step == 4 and decoder.lcfg.read_layers == (2,) and decoder.lcfg.lora.rank == 4
    assert float(jnp.abs(decoder.trainable["lora"]["q"]["b"]).max()) > 0  # trained (B starts at 0)
    earlier = load_decoder(str(workdir), step=2)
    assert earlier.step == 2
    assert not np.array_equal(np.asarray(earlier.trainable["lora"]["q"]["b"]),
                              np.asarray(decoder.trainable["lora"]["q"]["b"]))
    with pytest.raises(ValueError, match=r"step 3 was not saved .* saved steps: \[2, 4\]"):
        load_decoder(str(workdir), step=3)
    with pytest.raises(FileNotFoundError, match="has no lit_run.json"):
        load_decoder(str(workdir / "checkpoints"))


def test_load_from_the_export(workdir, decoder, reader):
    exported = load_decoder(str(workdir / "export"))
    assert exported.lcfg.lora is None and exported.step == 4  # the merged decoder runs on its own weights
    read = _reads(decoder.tokenizer)[0]
    cands = [["A pirate.", "Yes"]]
    np.testing.assert_allclose(exported.reader().score([read], [QUESTIONS[0]], cands)[0],
                               reader.score([read], [QUESTIONS[0]], cands)[0], rtol=1e-3)
    assert exported.reader(SamplingConfig(max_new_tokens=6)).ask([read], QUESTIONS[:1]) == reader.ask([read],
                                                                                                      QUESTIONS[:1])


def test_load_from_the_peft_export(workdir, decoder, reader, tmp_path):
    """The `lit` job's PEFT export (export.peft_dir), and the `export` task's from a work dir at a given step."""
    exported = load_decoder(str(workdir / "peft"))
    assert exported.lcfg == decoder.lcfg and exported.step == 4
    read = _reads(decoder.tokenizer)[0]
    cands = [["A pirate.", "Yes"]]
    np.testing.assert_allclose(exported.reader().score([read], [QUESTIONS[0]], cands)[0],
                               reader.score([read], [QUESTIONS[0]], cands)[0], rtol=1e-6)
    assert exported.reader(SamplingConfig(max_new_tokens=6)).ask([read], QUESTIONS[:1]) == reader.ask([read],
                                                                                                      QUESTIONS[:1])
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/export.py", f"--config.decoder={workdir}",
                        "--config.decoder_step=2", f"--config.export.peft_dir={tmp_path / 'step2'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    step2, earlier = load_decoder(str(tmp_path / "step2")), load_decoder(str(workdir), step=2)
    assert step2.step == 2
    np.testing.assert_array_equal(np.asarray(step2.trainable["lora"]["q"]["b"]),
                                  np.asarray(earlier.trainable["lora"]["q"]["b"]))


def test_target_must_be_the_trained_model(workdir, decoder, tmp_path):
    same = export_hf(jax.device_get(decoder.base), decoder.cfg, str(tmp_path / "same"), tokenizer=decoder.tokenizer)
    again = load_decoder(str(workdir), target=same)
    np.testing.assert_array_equal(np.asarray(again.base["embed"]), np.asarray(decoder.base["embed"]))

    small = dataclasses.replace(decoder.cfg, hidden_size=32, head_dim=8)
    other = export_hf(jax.device_get(llama.init_params(jax.random.key(1), small)), small, str(tmp_path / "small"),
                      tokenizer=decoder.tokenizer)
    with pytest.raises(DecoderMismatchError, match=r"hidden_size: trained with 64, target has 32"):
        load_decoder(str(workdir), target=other)

    import copy
    tok = copy.deepcopy(decoder.tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    retemplated = export_hf(jax.device_get(decoder.base), decoder.cfg, str(tmp_path / "tok"), tokenizer=tok)
    with pytest.raises(DecoderMismatchError, match="chat template"):
        load_decoder(str(workdir), target=retemplated)


def _greedy_without_cache(decoder, read, question, steps):
    """Reference decoding: the whole sequence re-run at every step, activations written each time."""
    reader, cfg, lcfg = decoder.reader(), decoder.cfg, decoder.lcfg
    tokens, positions = read
    prompt = reader.decoder_format.prompt(len(positions), question, lcfg.read_layers[0])
    slots = Slots(positions[None], np.full((1, len(positions)), lcfg.read_layers[0], np.int32),
                  prompt.write_positions[None], np.ones((1, len(positions)), bool))
    vectors = written_vectors(decoder.trainable, decoder.base, chains(tokens[None], np.ones((1, len(tokens)), bool)),
                              slots, cfg, lcfg)
    params, lora = decoder_weights(decoder.trainable, decoder.base, cfg, lcfg)
    edit = write_edit(ResidualWrite(vectors, slots.write_positions, slots.mask), lcfg.write_layer, lcfg.write_mode)
    seq = list(prompt.tokens)
    for _ in range(steps):
        out = llama.forward(params, jnp.asarray([seq]), cfg, lora=lora, edit=edit)
        seq.append(int(jnp.argmax(out.logits[0, -1])))
    return seq[len(prompt.tokens):]


def test_kv_cached_reading_equals_reading_without_cache(decoder, reader):
    read = _reads(decoder.tokenizer)[0]
    cached = reader.ask_tokens([read], [QUESTIONS[0]])[0]
    assert cached == _greedy_without_cache(decoder, read, QUESTIONS[0], len(cached))[: len(cached)]


def test_batched_equals_one_by_one(decoder, reader):
    reads = _reads(decoder.tokenizer)
    together = reader.ask(reads, QUESTIONS)
    assert together == [reader.ask([r], [q])[0] for r, q in zip(reads, QUESTIONS)]


def test_single_token_reads(decoder, reader):
    read = _reads(decoder.tokenizer)[0]
    singles = each_token(read, last=3)
    assert len(singles) == 3
    assert [int(p[0]) for _, p in singles] == [int(p) for p in read[1][-3:]]
    assert len(reader.ask(singles, [QUESTIONS[0]] * 3)) == 3
    assert len(each_token(read)) == len(read[1])
    assert np.array_equal(segment(read, 1, 3)[1], read[1][1:3])
    with pytest.raises(ValueError, match="is empty"):
        segment(read, 5, 5)


def test_candidate_scores_equal_the_training_loss(decoder, reader):
    read = _reads(decoder.tokenizer)[0]
    candidates = ["A pirate.", "An accountant who counts every coin.", "Yes"]
    scores = reader.score([read], [QUESTIONS[0]], [candidates])[0]
    assert scores.shape == (3,) and (scores < 0).all()
    layer = decoder.lcfg.read_layers[0]
    for cand, score in zip(candidates, scores):
        tokens, write, loss = reader.decoder_format.example(len(read[1]), QUESTIONS[0], cand, layer)
        ex = {"read_tokens": read[0], "read_positions": read[1], "decoder_tokens": tokens, "write_positions": write,
              "loss_mask": loss, "read_layer": layer}
        rows = collate([ex], [0], (len(read[0]), len(read[1]), len(tokens)), reader.pad_id, layer, int(loss.sum()))
        sums = lit_loss_sums(decoder.trainable, decoder.base, plain_batch(rows), decoder.cfg, decoder.lcfg)
        np.testing.assert_allclose(score, -float(sums.loss), rtol=1e-5, atol=1e-4)


def test_bad_reads_are_refused(decoder, reader):
    tok = decoder.tokenizer
    with pytest.raises(ValueError, match="'dialog' is empty"):
        tokenize_read(tok, [])
    read = _reads(tok)[0]
    with pytest.raises(ValueError, match="more than data.max_decoder_tokens"):
        reader.ask([read], ["why " * 1000])
    with pytest.raises(ValueError, match=r"layer 1 was not trained; trained read layers: \(2,\)"):
        reader.ask([read], [QUESTIONS[0]], layer=1)
    with pytest.raises(ValueError, match="no candidate answers"):
        reader.score([read], [QUESTIONS[0]], [[]])


def _read_cli(workdir, *overrides):
    return subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/read.py",
                           f"--config.decoder={workdir}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=ENV)


def test_read_task_from_jsonl_and_flags(workdir, decoder, tmp_path):
    import json

    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"dialog": DIALOGS[0], "read_from_turn": 1, "question": QUESTIONS[0], "answer": "A pirate."}) + "\n"
        + json.dumps({"text": "The capital of Japan is", "question": "Which city completes the text?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    r = _read_cli(workdir, f"--config.read.input={questions}", f"--config.read.output={out}",
                  "--config.read.max_new_tokens=4", "--config.read.candidates=('Yes', 'No')")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["question"] for row in rows] == [QUESTIONS[0], "Which city completes the text?"]
    assert rows[0]["true_answer"] == "A pirate." and "true_answer" not in rows[1]
    assert set(rows[0]["scores"]) == {"Yes", "No"} and all(v < 0 for v in rows[0]["scores"].values())
    # the same answers as the Python API
    reader = decoder.reader(SamplingConfig(max_new_tokens=4))
    assert rows[0]["answer"] == reader.ask([tokenize_read(decoder.tokenizer, DIALOGS[0], read_from_turn=1)],
                                           [QUESTIONS[0]])[0]
    assert "question: What persona will the assistant adopt?" in r.stdout

    r = _read_cli(workdir, f"--config.read.dialog={json.dumps(DIALOGS[1])}", "--config.read.read_from_turn=1",
                  f"--config.read.questions=('{QUESTIONS[1]}',)", "--config.read.each_token_last=3",
                  "--config.read.max_new_tokens=2", f"--config.read.output={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(row["token"] for row in rows)


def test_read_task_bad_input(workdir, tmp_path):
    r = _read_cli(workdir, "--config.read.questions=('Why?',)")
    assert r.returncode != 0 and "give exactly one of --config.read.input, .dialog, .text" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dialog": [], "question": "Why?"}\n')
    r = _read_cli(workdir, f"--config.read.input={bad}")
    assert r.returncode != 0 and f"{bad}: line 1: 'dialog' is empty" in r.stderr
