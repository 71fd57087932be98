"""The real default model: SmolLM2-135M-Instruct from its GGUF, against transformers' PyTorch model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lit_jax.generate import SamplingConfig, chat, generate
from lit_jax.lit.residual_stream import read_residual_stream
from lit_jax.models import llama

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_ids(tok):
    return tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2, hf_smollm2):
    ours, (_, theirs) = smollm2.tokenizer, hf_smollm2
    texts = ["Hello 12345 world!", "  spaces\tand\nnewlines  ", "naïve café — ünïcödé 😀", "<|im_start|>user\nhi<|im_end|>"]
    with open(os.path.join(DATA, "latentqa", "eval", "system.json")) as f:
        texts += [r["system"] + "\n" + r["stimulus_user"] for r in json.load(f)[:50]]
    for t in texts:
        assert ours(t).input_ids == theirs(t).input_ids, t
    assert _chat_ids(ours) == _chat_ids(theirs)
    assert ours.eos_token == "<|im_end|>" and ours.pad_token_id is not None


def test_logits_match_transformers(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    ids = np.array([_chat_ids(smollm2.tokenizer)])
    ours = llama.forward(smollm2.params, jnp.asarray(ids), smollm2.cfg).logits
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() < 1e-3


def test_reading_layer_matches_hidden_states(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    ids = np.array([_chat_ids(smollm2.tokenizer)])
    ours = read_residual_stream(smollm2.params, jnp.asarray(ids), smollm2.cfg, (15,))[0]
    with torch.no_grad():
        ref = model(torch.tensor(ids), output_hidden_states=True).hidden_states[16].numpy()
    assert np.abs(np.asarray(ours) - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_greedy_30_tokens_match_transformers_generate(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    ids = _chat_ids(smollm2.tokenizer)
    ours = generate(smollm2.params, smollm2.cfg, [ids], tokenizer=smollm2.tokenizer,
                    sampling=SamplingConfig(max_new_tokens=30))[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref
    assert "Paris" in smollm2.tokenizer.decode(ours)


def test_batched_chat_equals_one_by_one(smollm2):
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
    kw = dict(sampling=SamplingConfig(max_new_tokens=16))
    batched = chat(smollm2.params, smollm2.cfg, smollm2.tokenizer, questions, **kw)
    alone = [chat(smollm2.params, smollm2.cfg, smollm2.tokenizer, [q], **kw)[0] for q in questions]
    assert batched == alone
    assert all(a.strip() for a in batched)


def test_bfloat16_stays_close_to_float32(smollm2):
    ids = jnp.asarray([_chat_ids(smollm2.tokenizer)])
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), smollm2.params)
    ref = llama.forward(smollm2.params, ids, smollm2.cfg).logits
    out = llama.forward(bf16, ids, smollm2.cfg.replace(dtype="bfloat16")).logits
    assert out.dtype == jnp.float32
    # bf16 rounding may swap near-ties, but the predictions must overwhelmingly agree.
    agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
    assert agree >= 0.9, agree
    assert float(jnp.abs(out - ref).mean()) < 0.25
