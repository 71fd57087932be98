"""Reading several layers at once: one placeholder run per layer, each slot reading its own layer."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from lit_jax import load_decoder
from lit_jax.data import DecoderFormat, check_data_config, plain_batch, tokenize_read
from lit_jax.data.batching import collate
from lit_jax.data.errors import BadRecords
from lit_jax.data.examples import tokenize_records
from lit_jax.data.packing import pack_batch
from lit_jax.data.records import Record
from lit_jax.lit.config import LitConfig
from lit_jax.lit.job import load_model
from lit_jax.lit.loss import lit_loss_sums, read_activations
from lit_jax.lit.read import Reader
from lit_jax.lit.residual_stream import read_residual_stream
from lit_jax.lit.train_state import init_trainable
from lit_jax.models.lora import LoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = (1, 3)
DIALOG = (("system", "You are a pirate."), ("user", "Hello there, how are you?"))


def _data_cfg():
    c = tiny.get_config().data
    c.prompt_style, c.read_layers, c.read_all_layers = "oracle", LAYERS, True
    return c


@pytest.fixture(scope="module")
def setup():
    config = tiny.get_config()
    cfg, base, tok = load_model(config.model, 0)
    lcfg = LitConfig(read_layers=LAYERS, lora=LoraConfig(rank=4))
    trainable = init_trainable(jax.random.key(0), cfg, lcfg)
    trainable["lora"] = jax.tree.map(lambda x: x + 0.01, trainable["lora"])  # not the identity decoder
    return cfg, base, tok, lcfg, trainable


def _examples(tok, answers=("A pirate.", "A sailor who loves the sea.")):
    cfg = _data_cfg()
    fmt = DecoderFormat.create(tok, cfg)
    recs = [Record(label="x", question="Who is it?", answer=a, dialog=DIALOG, read_from_turn=1) for a in answers]
    return tokenize_records(recs, tok, fmt, LAYERS, BadRecords(), all_layers=True), fmt


def test_examples_have_one_run_per_layer(setup):
    _, _, tok, _, _ = setup
    [ex, _], fmt = _examples(tok)
    tokens, positions = tokenize_read(tok, [{"role": r, "content": c} for r, c in DIALOG], read_from_turn=1)
    s = len(positions)
    assert np.array_equal(ex["read_positions"], np.tile(positions, 2))
    assert np.array_equal(ex["slot_layers"], [1] * s + [3] * s)
    assert (ex["decoder_tokens"][ex["write_positions"]] == fmt.placeholder_id).all()
    text = tok.decode(ex["decoder_tokens"].tolist())
    ph = fmt.placeholder * s
    assert f"Layer: 1\n{ph}\nLayer: 3\n{ph}\nWho is it?" in text


def test_read_all_layers_needs_the_oracle_style():
    c = _data_cfg()
    c.prompt_style = "latentqa"
    with pytest.raises(ValueError, match="read_all_layers=True needs data.prompt_style='oracle'"):
        check_data_config(c)


def test_each_slot_reads_its_own_layer_plain_and_packed(setup):
    cfg, base, tok, lcfg, trainable = setup
    exs, _ = _examples(tok)
    shape = (64, 48, 160)
    rows = collate(exs, [0, 1], shape, 0, LAYERS[0], 32)
    plain = plain_batch(rows)
    s = len(exs[0]["read_positions"]) // 2
    acts = np.asarray(read_activations(base, plain.read, plain.slots, cfg, lcfg))
    hidden = np.asarray(read_residual_stream(base, exs[0]["read_tokens"][None], cfg, LAYERS))
    pos = exs[0]["read_positions"][:s]
    np.testing.assert_allclose(acts[0, :s], hidden[0, 0, pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts[0, s:2 * s], hidden[1, 0, pos], rtol=1e-5, atol=1e-5)
    packed = pack_batch(rows, num_rows=1, multiple=16)
    a = lit_loss_sums(trainable, base, plain, cfg, lcfg)
    b = lit_loss_sums(trainable, base, packed, cfg, lcfg)
    np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-4)
    assert float(a.count) == float(b.count)


def test_reader_reads_all_trained_layers(setup):
    cfg, base, tok, lcfg, trainable = setup
    reader = Reader(base, trainable, cfg, lcfg, tok, _data_cfg())
    read = tokenize_read(tok, [{"role": r, "content": c} for r, c in DIALOG], read_from_turn=1)
    assert len(reader.ask([read, read], ["Who is it?", "Where?"])) == 2
    with pytest.raises(ValueError, match=r"trained to read all of \(1, 3\) at once"):
        reader.ask([read], ["Who is it?"], layer=1)
    exs, _ = _examples(tok, ("A pirate.",))
    score = reader.score([read], ["Who is it?"], [["A pirate."]])[0][0]
    rows = collate(exs, [0], (64, 48, 160), 0, LAYERS[0], 32)
    loss = lit_loss_sums(trainable, base, plain_batch(rows), cfg, lcfg)
    np.testing.assert_allclose(score, -float(loss.loss), rtol=1e-5, atol=1e-4)


def test_training_a_multi_layer_decoder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                        "--config.data.prompt_style=oracle", "--config.data.read_layers=(1,3)",
                        "--config.data.read_all_layers=True", "--config.train.steps=2",
                        "--config.train.checkpoint_every=2", "--config.demo.num_examples=0",
                        "--config.train.eval_examples=4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    decoder = load_decoder(str(tmp_path))
    assert decoder.lcfg.read_layers == LAYERS and decoder.data_cfg.read_all_layers
    read = tokenize_read(decoder.tokenizer, [{"role": r, "content": c} for r, c in DIALOG], read_from_turn=1)
    from lit_jax.generate import SamplingConfig
    assert len(decoder.reader(SamplingConfig(max_new_tokens=3)).ask([read], ["Who is it?"])) == 1
