"""Control: steering the target with jax.grad through a frozen decoder (lit_jax/lit/control.py).

The decoder is the tiny config's (random 4-layer model over SmolLM2's tokenizer, read
layer 2), untrained, saved as a `lit` run's work dir would be and loaded with
load_decoder: control only needs a differentiable decoder loss, and this keeps the
module fast (the `lit` training itself is tested elsewhere).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax import load_decoder
from lit_jax.data import DecoderFormat
from lit_jax.data.errors import DataError
from lit_jax.generate import SamplingConfig, end_token_ids, generate
from lit_jax.lit import control as C
from lit_jax.models import llama
from lit_jax.models.lora import LoraWeights
from lit_jax.models.steering import Steering, dense_vectors, steered_forward
from tests.trace_counter import count_traces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
GOLDEN_GATE = os.path.join(ROOT, "..", "shared", "data", "latentqa", "controls", "golden_gate.json")
PROMPTS = os.path.join(ROOT, "configs", "control_prompts.jsonl")
QA = [("What type of persona will the assistant adopt?", "Someone obsessed with the Golden Gate Bridge."),
      ("What will the assistant talk about?", "The Golden Gate Bridge, as much as possible.")]


def _save_untrained_decoder(workdir: str) -> None:
    """A `lit` work dir holding the tiny config's untrained decoder at step 0 (what load_decoder reads)."""
    sys.path.insert(0, ROOT)
    from configs import tiny
    from lit_jax.lit.checkpoint import Checkpointer
    from lit_jax.lit.job import load_model, run_meta
    from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer
    from lit_jax.lit.trained import save_run_settings
    from lit_jax.settings import lit_from_section

    config = tiny.get_config()
    cfg, base, tok = load_model(config.model, config.seed)
    lcfg = lit_from_section(config.lit, config.data.read_layers)
    save_run_settings(workdir, config, tok)
    state = init_state(init_trainable(jax.random.key(0), cfg, lcfg, base), make_optimizer(1e-3, 0, 1))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(0, state, {}, run_meta(cfg, lcfg, config.data, tok))
    ckpt.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("decoder"))
    _save_untrained_decoder(path)
    return path


@pytest.fixture(scope="module")
def decoder(workdir):
    return load_decoder(workdir)


@pytest.fixture(scope="module")
def prompts():
    return C.split_prompts(C.read_prompts(PROMPTS), 6, 3, seed=0)


def _small(**kw):
    return C.ControlConfig(**{"steps": 5, "batch_size": 4, "eval_examples": 8, "vector_lr": 0.3, "lora_lr": 1e-2,
                              **kw})


@pytest.fixture(scope="module")
def vector_result(decoder, prompts):
    with count_traces() as traces:
        result = C.optimize_control(decoder, QA, *prompts, _small(method="vectors", layers=(0, 1)), progress=False)
    return result, dict(traces)


def _batch(decoder, spec, prompts, qa):
    fmt = DecoderFormat.create(decoder.tokenizer, decoder.data_cfg)
    examples, _ = C.control_examples(decoder.tokenizer, fmt, prompts, qa, spec.read_layer, 256)
    return C.make_batch(examples, C.bucket_for(examples, len(examples)), C._pad_id(decoder.tokenizer),
                        spec.read_layer)


def test_shipped_prompts_and_split():
    prompts = C.read_prompts(PROMPTS)
    assert len(prompts) == 60 and len(set(prompts)) == 60
    train, held = C.split_prompts(prompts, 40, 20, seed=0)
    assert len(train) == 40 and len(held) == 20 and not set(train) & set(held)
    assert C.split_prompts(prompts, 40, 20, seed=0) == (train, held)
    small_train, small_held = C.split_prompts(prompts[:6], 40, 20)
    assert len(small_train) + len(small_held) == 6 and small_held
    assert len(C.read_control_file(GOLDEN_GATE)) == 15


def test_reads_dolly_and_alpaca_records(tmp_path):
    path = tmp_path / "dolly.jsonl"
    path.write_text(json.dumps({"instruction": "Summarise this.", "context": "A long text.", "response": "x"}) + "\n\n"
                    + json.dumps({"instruction": "Translate", "input": "bonjour", "output": "hello"}) + "\n")
    assert C.read_prompts(str(path)) == ["Summarise this.\n\nA long text.", "Translate\n\nbonjour"]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["What color is the sky?", {"prompt": "Hi"}]))
    assert C.read_prompts(str(listed)) == ["What color is the sky?", "Hi"]


def test_gradient_matches_finite_differences(decoder, prompts):
    spec = C.control_spec(decoder, _small(method="vectors", layers=(0, 1), vector_penalty=0.5))
    batch = _batch(decoder, spec, prompts[0][:2], QA)
    scales = jnp.asarray([0.2, 0.25], jnp.float32)
    read_scale = jnp.asarray(0.3, jnp.float32)
    theta = {"vectors": 0.3 * jax.random.normal(jax.random.key(1), (2, decoder.cfg.hidden_size)) / 8.0}
    direction = jax.random.normal(jax.random.key(2), theta["vectors"].shape)
    direction = direction / jnp.linalg.norm(direction)

    def loss(th):
        return C.control_loss(th, decoder.trainable, decoder.base, batch, scales, read_scale, spec=spec,
                              cfg=decoder.cfg, lcfg=decoder.lcfg)[0]

    loss = jax.jit(loss)
    grad = jax.grad(loss)(theta)
    analytic = float(jnp.sum(grad["vectors"] * direction))
    eps = 0.05
    numeric = (float(loss({"vectors": theta["vectors"] + eps * direction}))
               - float(loss({"vectors": theta["vectors"] - eps * direction}))) / (2 * eps)
    assert abs(analytic) > 1e-3  # the loss does depend on the vectors
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2)


def test_vectors_lower_the_decoder_loss_within_the_budget(vector_result):
    result, traces = vector_result
    for split in ("train", "heldout"):
        assert result.after[split]["answer_loss"] < result.before[split]["answer_loss"] - 1e-2
    assert result.history[-1] < result.history[0]
    assert traces.get("step") == 1  # one compilation for every step (fixed batch shape)
    relative = np.linalg.norm(np.asarray(result.theta["vectors"]), axis=-1)
    assert (relative <= result.spec.max_norm + 1e-5).all() and (relative > 0.1).all()
    rows = np.asarray(result.steering.vectors)
    assert np.abs(rows[2:]).max() == 0 and np.abs(rows[:2]).min(axis=-1).max() > 0  # blocks 0 and 1 only


def test_target_lora_per_layer_lowers_every_layers_loss(decoder, prompts):
    # no penalty: on a random decoder the answer loss barely moves, and the shift penalty would pin it
    result = C.optimize_control(decoder, QA, *prompts, _small(method="lora", per_layer=True, lora_penalty=0.0),
                                progress=False)
    assert result.spec.layers == (0, 1, 2)
    before, after = result.before["train"], result.after["train"]
    assert len(after["loss_per_layer"]) == 3
    assert after["summed_loss"] < before["summed_loss"] - 1e-2
    assert after["answer_loss"] < before["answer_loss"]
    assert result.after["heldout"]["summed_loss"] < result.before["heldout"]["summed_loss"]
    # adapters only on blocks 0..2 (the read layer): block 3 has none
    assert all(np.abs(np.asarray(ab["b"])[3]).max() == 0 for ab in result.steering.lora.params.values())


def _first_logits(decoder, prompt, steering):
    tokens = jnp.asarray(C.prompt_read(decoder.tokenizer, prompt)[0])[None]
    out = steered_forward(decoder.base, tokens, decoder.cfg, steering=steering)
    return np.asarray(out.logits[0, -1])


def test_steering_changes_the_next_token_distribution(decoder, prompts, vector_result):
    prompt = prompts[1][0]
    plain = np.asarray(llama.forward(decoder.base, jnp.asarray(C.prompt_read(decoder.tokenizer, prompt)[0])[None],
                                     decoder.cfg).logits[0, -1])
    steered = _first_logits(decoder, prompt, vector_result[0].steering)
    p, q = jax.nn.softmax(plain), jax.nn.softmax(steered)
    assert float(jnp.abs(p - q).sum()) > 1e-3
    zero = Steering(vectors=jnp.zeros((decoder.cfg.num_layers, decoder.cfg.hidden_size)))
    np.testing.assert_array_equal(_first_logits(decoder, prompt, zero), plain)
    spec = C.control_spec(decoder, _small(method="lora"))
    untrained_lora = C.steering_of(C.init_theta(jax.random.key(0), spec, decoder.cfg), jnp.zeros(0), spec,
                                   decoder.cfg)
    np.testing.assert_array_equal(_first_logits(decoder, prompt, untrained_lora), plain)


def test_generation_applies_steering_at_every_decode_step(decoder, prompts, vector_result):
    """Cached generation with steering equals re-running the steered model on the whole sequence each step."""
    steering, cfg = vector_result[0].steering, decoder.cfg
    prompt = list(C.prompt_read(decoder.tokenizer, prompts[1][1])[0])
    n = 6
    eos = end_token_ids(cfg, decoder.tokenizer)
    cached = generate(decoder.base, cfg, [prompt], tokenizer=decoder.tokenizer, sampling=SamplingConfig(n),
                      steering=steering)[0]
    seq, length = list(prompt), len(prompt) + n  # right-padded to one length: one compilation, same logits

    @jax.jit
    def next_logits(tokens, valid, last):
        return steered_forward(decoder.base, tokens, cfg, steering=steering, valid=valid, logits_at=last).logits

    for _ in range(n):
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(seq)] = seq
        logits = next_logits(tokens, np.arange(length)[None] < len(seq), np.asarray([[len(seq) - 1]], np.int32))
        seq.append(int(jnp.argmax(logits[0, 0])))
        if seq[-1] in eos:
            break
    assert cached == seq[len(prompt):]
    plain = generate(decoder.base, cfg, [prompt], tokenizer=decoder.tokenizer, sampling=SamplingConfig(n))[0]
    assert cached != plain  # the steering matters here, so the comparison above can fail
    zero = Steering(vectors=jnp.zeros((cfg.num_layers, cfg.hidden_size)))
    assert generate(decoder.base, cfg, [prompt], tokenizer=decoder.tokenizer, sampling=SamplingConfig(n),
                    steering=zero)[0] == plain


def test_saved_result_reloads_and_generates_identically(decoder, prompts, vector_result, tmp_path):
    result, cfg = vector_result[0], decoder.cfg
    out = str(tmp_path / "golden_gate_vectors")
    C.save_steering(out, result, {"decoder": decoder.path, "control_file": GOLDEN_GATE, "steps": 5})
    C.save_steering(out, result, {"decoder": decoder.path, "control_file": GOLDEN_GATE, "steps": 5})  # replaces
    assert sorted(os.listdir(tmp_path)) == ["golden_gate_vectors"]  # no temporary left behind
    loaded = C.load_steering(out, cfg)
    np.testing.assert_allclose(np.asarray(loaded.steering.vectors), np.asarray(result.steering.vectors), rtol=1e-6)
    s = loaded.settings
    assert s["method"] == "vectors" and s["layers"] == [0, 1] and s["read_layer"] == 2 and s["steps"] == 5
    assert s["loss_after"]["heldout"]["answer_loss"] < s["loss_before"]["heldout"]["answer_loss"]
    assert max(s["relative_norms"]) <= result.spec.max_norm + 1e-5
    heldout = [list(C.prompt_read(decoder.tokenizer, p)[0]) for p in prompts[1]]
    gen = lambda st: generate(decoder.base, cfg, heldout, tokenizer=decoder.tokenizer,  # noqa: E731
                              sampling=SamplingConfig(6), steering=st)
    assert gen(loaded.steering) == gen(result.steering)

    spec = C.control_spec(decoder, _small(method="lora"))
    theta = C.init_theta(jax.random.key(3), spec, cfg)
    theta = {"lora": jax.tree.map(lambda a: a + 0.05, theta["lora"])}  # nonzero B: a real change
    lora_result = result._replace(theta=theta, spec=spec, steering=C.steering_of(theta, jnp.zeros(0), spec, cfg))
    C.save_steering(str(tmp_path / "lora"), lora_result)
    back = C.load_steering(str(tmp_path / "lora"), cfg)
    assert isinstance(back.steering.lora, LoraWeights) and back.steering.lora.scale == spec.lora.scale
    assert gen(back.steering) == gen(lora_result.steering)

    import dataclasses
    with pytest.raises(ValueError, match="hidden size is 32"):
        C.load_steering(out, dataclasses.replace(cfg, hidden_size=32))
    with pytest.raises(FileNotFoundError, match="no steering.json"):
        C.load_steering(str(tmp_path))


def test_bad_control_files_are_refused_by_name(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"Be a pirate.": []}))
    with pytest.raises(DataError, match=r"empty.json: no \(question, answer\) pairs"):
        C.read_control_file(str(empty))
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps({"Be a pirate.": [["What persona?", "A pirate."], ["Only a question"]]}))
    with pytest.raises(DataError, match=r"malformed.json: key 'Be a pirate.', pair 1: expected \[question, answer\]"):
        C.read_control_file(str(malformed))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([["q", "a"]]))
    with pytest.raises(DataError, match="list.json: expected a JSON object"):
        C.read_control_file(str(listed))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        C.read_control_file(str(broken))


def test_bad_prompt_files_are_refused_by_name(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no prompts"):
        C.read_prompts(str(empty))
    no_field = tmp_path / "fields.jsonl"
    no_field.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"response": "no prompt"}) + "\n")
    with pytest.raises(DataError, match="fields.jsonl: line 2: no prompt"):
        C.read_prompts(str(no_field))
    with pytest.raises(DataError, match="prompts file not found"):
        C.read_prompts(str(tmp_path / "missing.jsonl"))


def test_steering_layers_out_of_range_are_refused(decoder):
    for layers in [(2,), (3,), (-1,), (0, 5)]:
        with pytest.raises(ValueError, match=r"control.layers=.*out of range; allowed: 0..1 \(before the read layer 2"):
            C.control_spec(decoder, _small(method="vectors", layers=layers))
    with pytest.raises(ValueError, match="repeats a layer"):
        C.control_spec(decoder, _small(method="vectors", layers=(1, 1)))
    with pytest.raises(ValueError, match=r"control.read_layer=3: the decoder was trained on layers \(2,\)"):
        C.control_spec(decoder, _small(method="vectors", read_layer=3))
    with pytest.raises(ValueError, match=r"control.layers=\(1,\) is for method=vectors; method=lora adapts 0..2"):
        C.control_spec(decoder, _small(method="lora", layers=(1,)))
    with pytest.raises(ValueError, match="control.method='steer'"):
        C.ControlConfig(method="steer")
    with pytest.raises(ValueError, match=r"steering layer\(s\) \[4\] outside the model's blocks \[0, 4\)"):
        dense_vectors((4,), jnp.zeros((1, 8)), 4)


def _main(*args):
    return subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/control.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ENV)


def test_control_task_end_to_end(workdir, tmp_path):
    r = _main(f"--config.decoder={workdir}", f"--workdir={tmp_path}", "--config.control.steps=3",
              "--config.control.num_train=4", "--config.control.num_heldout=2", "--config.control.batch_size=4",
              "--config.control.eval_examples=4", "--config.control.max_new_tokens=4",
              "--config.control.method=lora", "--config.control.num_generations=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decoder loss on the desired answers, train" in r.stdout and "before:" in r.stdout
    out = tmp_path / "golden_gate_lora"
    settings = json.loads((out / "steering.json").read_text())
    assert settings["method"] == "lora" and settings["decoder"] == workdir and len(settings["generations"]) == 2
    assert settings["control_file"].endswith("golden_gate.json") and settings["steps"] == 3

    bad = _main(f"--config.decoder={workdir}", f"--workdir={tmp_path}", "--config.control.layers=(2,)")
    assert bad.returncode != 0 and "control.layers=(2,)" in bad.stderr and "allowed: 0..1" in bad.stderr
