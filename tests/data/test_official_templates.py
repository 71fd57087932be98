"""Every listed model family with its official chat template, as target (read spans) and as decoder.

For the four LatentQA record shapes: the read span is exactly the intended turns (compared
with the family's documented format, written out by hand in chat_families.FAMILIES), every
masked turn's text is absent from the tokens read, and a template that cannot mask a turn is
refused with its reason. For the decoder, in both prompt styles: S placeholder slots, the loss
on exactly the answer and its end-of-turn token, a generation prompt that is the training
sequence's prefix token for token, and tokens equal to tokenizing the whole rendered text.
"""

import numpy as np
import pytest

from lit_jax.data import DecoderFormat, TemplateError, tokenize_read
from lit_jax.data.config import LATENTQA_CORPUS, resolve_data_dir
from lit_jax.data.decoder import template_end_of_turn_id
from lit_jax.data.errors import BadRecords
from lit_jax.data.readers import read_all_sources
from tests.data.chat_families import FAMILIES, build_tokenizers, family_tokenizer
from tests.data.conftest import memory_config

SHAPES = ("control", "stimulus", "system", "stimulus_completion")  # eval/control, eval/stimulus, eval/system, v0/...


@pytest.fixture(scope="module")
def records():
    cfg = memory_config(sources=LATENTQA_CORPUS)
    by_source = {recs[0].source: recs for _, recs in read_all_sources(cfg, resolve_data_dir(cfg), BadRecords())}
    pick = {"control": "eval/control.json", "stimulus": "eval/stimulus.json", "system": "eval/system.json",
            "stimulus_completion": "v0/stimulus_completion.json"}
    return {shape: by_source[f"latentqa/{file}"][:6:2] for shape, file in pick.items()}  # 3 dialogs per shape


@pytest.fixture(scope="module")
def tokenizers(smollm2_tok, llama3_tok):
    cfg = memory_config()
    return build_tokenizers(smollm2_tok, llama3_tok, resolve_data_dir(cfg))


def _expected_span(fam, shape, dialog):
    text = {i: content for i, (_, content) in enumerate(dialog)}
    if shape == "control":
        return (fam.first_user or fam.user).format(x=text[0])
    if shape == "stimulus_completion":
        return fam.completion.format(x=text[2], y=text[3])
    return fam.user.format(x=text[2] if shape == "stimulus" else text[1])


def _span_text(tok, text, tokens, positions):
    """The characters covered by the read tokens (offsets from tokenizing the rendered dialog again)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == tokens.tolist()
    off = np.asarray(enc["offset_mapping"])
    return text[off[positions[0], 0]: off[positions[-1], 1]]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_read_spans_and_masks(tokenizers, records, name, shape):
    fam, tok = FAMILIES[name], family_tokenizer(tokenizers, name)
    for r in records[shape]:
        if shape == "system" and fam.system_refused:
            with pytest.raises(TemplateError, match=fam.system_refused):
                tokenize_read(tok, r.messages, read_from_turn=r.read_from_turn)
            continue
        tokens, positions = tokenize_read(tok, r.messages, read_from_turn=r.read_from_turn,
                                          generation_prompt=r.generation_prompt)
        text = tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=r.generation_prompt)
        span = _span_text(tok, text, tokens, positions)
        expected = _expected_span(fam, shape, r.dialog)
        # SentencePiece tokens carry the space before them: compare the characters they cover
        assert span.strip(" ") == expected.strip(" "), (span, expected)
        assert np.array_equal(positions, np.arange(positions[0], len(tokens)))  # contiguous, to the end
        read = tok.decode(tokens[positions], skip_special_tokens=False)
        for i, (role, content) in enumerate(r.dialog):
            if i < r.read_from_turn:  # masked: asserted absent, never assumed
                assert content not in span and content not in read, (i, role)
            else:
                assert content in span, (i, role)


def test_system_prompt_merged_into_user_turn_is_refused_with_its_reason(tokenizers, records):
    """Mistral v0.3 writes the system text into the last user turn's [INST] block: reading from
    the user turn would read the system prompt (the LatentQA label's evidence) directly."""
    tok = family_tokenizer(tokenizers, "mistral_v0.3")
    r = records["system"][0]
    rendered = tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
    assert f"[INST] {r.dialog[0][1]}\n\n{r.dialog[1][1]}[/INST]" in rendered  # the template's own doing
    with pytest.raises(TemplateError, match="does not write turn 0 \\(system\\) unless a later turn follows"):
        tokenize_read(tok, r.messages, read_from_turn=1)
    # reading the whole dialog masks nothing, so it is fine
    tokens, positions = tokenize_read(tok, r.messages, read_from_turn=0)
    assert r.dialog[0][1] in tok.decode(tokens[positions])


def test_qwen3_history_think_blocks(tokenizers):
    """Qwen3 writes an empty think block only into an assistant turn after the last user turn: a
    prefix of the dialog renders its last assistant turn differently from the full dialog."""
    tok = family_tokenizer(tokenizers, "qwen3")
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "And now?"}]
    prefix = tok.apply_chat_template(dialog[:2], tokenize=False)
    full = tok.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert "<think>" in prefix and "<think>" not in full  # not append-only
    tokens, positions = tokenize_read(tok, dialog, read_from_turn=2)
    assert tok.decode(tokens[positions], skip_special_tokens=False) == (
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n")
    tokens, positions = tokenize_read(tok, dialog, read_from_turn=1)
    assert tok.decode(tokens[positions], skip_special_tokens=False) == (
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("style", ["latentqa", "oracle"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_decoder_prompt(tokenizers, records, name, style, caplog):
    fam, tok = FAMILIES[name], family_tokenizer(tokenizers, name)
    eot = tok.convert_tokens_to_ids(fam.eot)
    with caplog.at_level("WARNING", logger="lit_jax.data"):
        fmt = DecoderFormat.create(tok, memory_config(prompt_style=style))
        assert fmt.check_natural(15)  # the tokens any other use of the template gives
    assert not caplog.text
    assert fmt.end_of_turn_id == eot and template_end_of_turn_id(tok) == eot
    for r in records["stimulus"][:2]:
        s = 5
        tokens, write, loss = fmt.example(s, r.question, r.answer, 15)
        assert len(write) == s and (tokens[write] == fmt.placeholder_id).all()
        assert (tokens == fmt.placeholder_id).sum() == s
        assert tokens[-1] == eot and loss[-1]
        first = int(np.argmax(loss))
        assert loss[first:].all() and not loss[:first].any()
        assert tok.decode(tokens[first:-1], skip_special_tokens=True).strip() == r.answer
        assert r.question in tok.decode(tokens[:first], skip_special_tokens=False)
        prompt = fmt.prompt(s, r.question, 15)
        assert np.array_equal(prompt.tokens, tokens[:first]) and np.array_equal(prompt.write_positions, write)
        assert prompt.generation_start == first
        # generating from the prompt reproduces the training text
        assert tok.decode(tokens, skip_special_tokens=False).endswith(fam.eot)
    if name == "qwen3":  # the empty think block Qwen3 writes before a final answer is in the prompt
        assert tok.decode(prompt.tokens, skip_special_tokens=False).endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if name.startswith("mistral") or name == "llama2":  # the space after [/INST] belongs to the answer
        assert tok.decode(prompt.tokens, skip_special_tokens=False).endswith("[/INST]")
