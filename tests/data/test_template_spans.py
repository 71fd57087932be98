"""Spans from the chat template on real data: SmolLM2 (ChatML, default system prompt) and a Llama-3 template.

For each record kind: the read span decodes to exactly the intended turns (control/system
text masked out where it must be), slots == activations, and the loss covers exactly the
answer + end-of-turn tokens.
"""

import numpy as np
import pytest

from lit_jax.data import DecoderFormat, decoder_prompt, resolve_placeholder, tokenize_read
from lit_jax.data.config import LATENTQA_CORPUS, resolve_data_dir
from lit_jax.data.errors import BadRecords
from lit_jax.data.examples import tokenize_records
from lit_jax.data.readers import read_all_sources
from tests.data.conftest import memory_config

CHATML = dict(user="<|im_start|>user\n", assistant="<|im_start|>assistant\n", eot="<|im_end|>", sep="\n")
LLAMA3 = dict(user="<|start_header_id|>user<|end_header_id|>\n\n",
              assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", eot="<|eot_id|>", sep="")
KINDS = ("control", "stimulus", "system", "v0/stimulus", "stimulus_completion")


@pytest.fixture(scope="module")
def records():
    """The first record of each LatentQA file, one relation and one classification record."""
    cfg = memory_config(sources=LATENTQA_CORPUS + ("relations/factual/country_capital_city.json",
                                                   "classification/gmt_cities.csv"))
    fams = read_all_sources(cfg, resolve_data_dir(cfg), BadRecords())
    recs = [r for _, rs in fams for r in rs[:1]]
    return dict(zip(KINDS + ("relation", "classification"), recs))


def _decode(tok, ids):
    return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _example(tok, record, **overrides):
    cfg = memory_config(**overrides)
    fmt = DecoderFormat.create(tok, cfg)
    [ex] = tokenize_records([record], tok, fmt, cfg.read_layers, BadRecords())
    return ex, fmt


def _turn(t, role, text):
    return t[role] + text + t["eot"] + t["sep"]


@pytest.mark.parametrize("tok_name,t", [("smollm2_tok", CHATML), ("llama3_tok", LLAMA3)])
@pytest.mark.parametrize("kind", KINDS)
def test_latentqa_read_spans_slots_and_loss(request, records, tok_name, t, kind):
    tok = request.getfixturevalue(tok_name)
    r = records[kind]
    turns = {f"{role}{i}": text for i, (role, text) in enumerate(r.dialog)}
    ex, fmt = _example(tok, r)
    read, span = _decode(tok, ex["read_tokens"]), _decode(tok, ex["read_tokens"][ex["read_positions"]])
    if kind == "control":
        expected = _turn(t, "user", turns["user0"]) + t["assistant"]
    elif kind == "stimulus_completion":
        expected = _turn(t, "user", turns["user2"]) + _turn(t, "assistant", turns["assistant3"])
    else:
        last = "user2" if kind.endswith("stimulus") else "user1"
        expected = _turn(t, "user", turns[last]) + t["assistant"]
    assert span == expected
    assert read.endswith(span)  # the span is the rendered dialog's tail...
    masked = read[: len(read) - len(span)]
    for name, text in turns.items():  # ...and everything before the read turns is masked out
        assert (text in masked) == (int(name[-1]) < r.read_from_turn), name
    if tok_name == "smollm2_tok":
        # the template's default system prompt stands where the dialog brings none (it is masked out)
        assert ("You are a helpful AI assistant named SmolLM" in masked) == ("system0" not in turns)
    # slots == activations, placeholders only at the write positions
    s = len(ex["read_positions"])
    assert len(ex["write_positions"]) == s and s > 0
    assert (ex["decoder_tokens"][ex["write_positions"]] == fmt.placeholder_id).all()
    assert (ex["decoder_tokens"] == fmt.placeholder_id).sum() == s
    # loss: exactly the answer + end-of-turn, at the end of the sequence
    loss = ex["loss_mask"]
    assert _decode(tok, ex["decoder_tokens"][loss]) == r.answer + t["eot"]
    first = int(np.argmax(loss))
    assert loss[first:].all() and not loss[:first].any() and not loss[0]
    assert _decode(tok, ex["decoder_tokens"][:first]).endswith(r.question + t["eot"] + t["sep"] + t["assistant"])


@pytest.mark.parametrize("tok_name", ["smollm2_tok", "llama3_tok"])
def test_concatenation_matches_the_rendered_template(request, records, tok_name):
    """Token-id concatenation gives what tokenizing the rendered decoder dialog gives (placeholders included)."""
    tok = request.getfixturevalue(tok_name)
    r = records["system"]
    ex, fmt = _example(tok, r)
    s = len(ex["read_positions"])
    msgs = [{"role": "user", "content": fmt.placeholder * s}, {"role": "assistant", "content": fmt.acknowledgement},
            {"role": "user", "content": r.question}, {"role": "assistant", "content": r.answer}]
    natural = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert natural[: len(ex["decoder_tokens"])] == ex["decoder_tokens"].tolist()
    assert natural[len(ex["decoder_tokens"]):] == tok("\n" if tok_name == "smollm2_tok" else "",
                                                      add_special_tokens=False)["input_ids"]


def test_boundary_merge_warning(smollm2_tok, llama3_tok, caplog):
    """A GPT-2-style split merges the template's "\\n\\n" with what follows: concatenation says so."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.data.conftest import LLAMA3_SPECIAL, LLAMA3_TEMPLATE

    backend = Tokenizer.from_str(llama3_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = Tokenizer.from_str(smollm2_tok.backend_tokenizer.to_str()).pre_tokenizer
    gpt2_split = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=LLAMA3_SPECIAL[0], eos_token="<|eot_id|>",
                                         chat_template=LLAMA3_TEMPLATE)
    with caplog.at_level("WARNING", logger="lit_jax.data"):
        assert DecoderFormat.create(llama3_tok, memory_config()).check_natural(15)
        assert not caplog.text
        assert not DecoderFormat.create(gpt2_split, memory_config()).check_natural(15)
    assert "merges across the end of the generation prompt" in caplog.text


@pytest.mark.parametrize("kind", ["relation", "classification"])
def test_plain_text_reads(smollm2_tok, records, kind):
    r = records[kind]
    ex, _ = _example(smollm2_tok, r)
    assert len(ex["read_positions"]) == len(ex["read_tokens"])  # the whole text is read
    assert _decode(smollm2_tok, ex["read_tokens"]) == r.text
    assert _decode(smollm2_tok, ex["decoder_tokens"][ex["loss_mask"]]) == r.answer + "<|im_end|>"


def test_train_on_acknowledgement(smollm2_tok, records):
    r = records["control"]
    ex, fmt = _example(smollm2_tok, r, train_on_acknowledgement=True)
    assert _decode(smollm2_tok, ex["decoder_tokens"][ex["loss_mask"]]) == (
        "Sure, I've analyzed the assistant.<|im_end|>" + r.answer + "<|im_end|>")


@pytest.mark.parametrize("tok_name,t", [("smollm2_tok", CHATML), ("llama3_tok", LLAMA3)])
def test_oracle_style_with_sampled_layers(request, records, tok_name, t):
    tok = request.getfixturevalue(tok_name)
    cfg = memory_config(prompt_style="oracle", read_layers=(3, 9, 15))
    fmt = DecoderFormat.create(tok, cfg)
    recs = [records[k] for k in KINDS]
    exs = tokenize_records(recs, tok, fmt, cfg.read_layers, BadRecords())
    assert {int(e["read_layer"]) for e in exs} <= {3, 9, 15} and len({int(e["read_layer"]) for e in exs}) > 1
    for r, ex in zip(recs, exs):
        s = len(ex["read_positions"])
        text = _decode(tok, ex["decoder_tokens"])
        assert t["user"] + f"Layer: {int(ex['read_layer'])}\n" + fmt.placeholder * s + "\n" + r.question + t["eot"] in text
        assert (ex["decoder_tokens"][ex["write_positions"]] == fmt.placeholder_id).all()
        assert _decode(tok, ex["decoder_tokens"][ex["loss_mask"]]) == r.answer + t["eot"]
    with pytest.raises(ValueError, match="train_on_acknowledgement needs prompt_style='latentqa'"):
        from lit_jax.data import check_data_config

        check_data_config(memory_config(prompt_style="oracle", train_on_acknowledgement=True))


@pytest.mark.parametrize("style", ["latentqa", "oracle"])
def test_decoder_prompt_is_the_training_prefix(smollm2_tok, records, style):
    r = records["stimulus"]
    ex, fmt = _example(smollm2_tok, r, prompt_style=style)
    s = len(ex["read_positions"])
    p = decoder_prompt(smollm2_tok, memory_config(prompt_style=style), r.question, num_slots=s)
    assert p.generation_start == len(p.tokens) == int(np.argmax(ex["loss_mask"]))
    assert np.array_equal(p.tokens, ex["decoder_tokens"][: p.generation_start])
    assert np.array_equal(p.write_positions, ex["write_positions"])
    assert _decode(smollm2_tok, p.tokens).endswith("<|im_start|>assistant\n")
    assert fmt.end_of_turn_id == smollm2_tok.convert_tokens_to_ids("<|im_end|>")


def test_tokenize_read_matches_training_reads(smollm2_tok, llama3_tok, records):
    for tok in (smollm2_tok, llama3_tok):
        for kind in KINDS:
            r = records[kind]
            ex, _ = _example(tok, r)
            tokens, positions = tokenize_read(tok, r.messages, read_from_turn=r.read_from_turn,
                                              generation_prompt=r.generation_prompt)
            assert np.array_equal(tokens, ex["read_tokens"]) and np.array_equal(positions, ex["read_positions"])
    tokens, positions = tokenize_read(smollm2_tok, "The capital of Japan is", read_chars=(15, 20))
    assert _decode(smollm2_tok, tokens[positions]) == " Japan"
    with pytest.raises(ValueError, match="read_from_turn=2 is outside"):
        tokenize_read(smollm2_tok, [{"role": "user", "content": "hi"}], read_from_turn=2)


def test_placeholder_choice(smollm2_tok, llama3_tok):
    assert resolve_placeholder(smollm2_tok) == ("<empty_output>", 16)
    assert resolve_placeholder(llama3_tok)[0] == "<|reserved_special_token_0|>"
    assert resolve_placeholder(smollm2_tok, " ?") == (" ?", smollm2_tok.encode(" ?")[0])
    with pytest.raises(ValueError, match="does not tokenize to one token per repetition"):
        resolve_placeholder(smollm2_tok, " xyzzyq")
    with pytest.raises(ValueError, match="occurs in the chat template itself"):
        DecoderFormat.create(smollm2_tok, memory_config(placeholder_token="<|im_start|>"))
