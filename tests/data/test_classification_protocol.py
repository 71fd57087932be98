"""Classification records in the Activation Oracles protocol (data.classification_read="user_turn"):
the sentence as one user turn, only its last token(s) read, every other question negated."""

import json

import numpy as np
import pytest

from lit_jax.data import Record, default_data_config, read_jsonl, tokenize_read, write_jsonl
from lit_jax.data.chat import read_text, tokenize_reads
from lit_jax.data.config import check_data_config, resolve_data_dir
from lit_jax.data.errors import BadRecords
from lit_jax.data.readers import YES_NO, read_all_sources, read_classification


def _csv(tmp_path, name="gmt_cities"):
    path = tmp_path / f"{name}.csv"
    path.write_text("statement,label\nParis is in France.,1\nParis is in Peru.,0\nRome is in Italy.,1\n"
                    "Rome is in Chile.,0\n")
    return str(path)


def test_user_turn_records_negate_half_the_questions(tmp_path):
    import zlib

    records = read_classification(_csv(tmp_path), BadRecords(), read="user_turn", tokens=2)
    truth = [True, False, True, False]
    for r, true in zip(records, truth):
        negated = zlib.crc32(r.dialog[0][1].encode()) % 2 == 1
        assert r.question == ("Is this statement false?" if negated else "Is this statement true?")
        assert r.answer == ("Yes" if true != negated else "No")
    assert all(r.dialog == (("user", r.dialog[0][1]),) and not r.generation_prompt and r.read_last == 2
               for r in records)
    text = read_classification(_csv(tmp_path), BadRecords())  # the default: plain text, all tokens, no negation
    assert all(r.text and r.read_last == 0 and r.question == "Is this statement true?" for r in text)
    assert [r.answer for r in text] == ["Yes", "No", "Yes", "No"]


def test_real_files_answers_balance_in_the_protocol():
    cfg = default_data_config()
    cfg.sources = ("classification/gmt_cities.csv", "classification/engels_5_hist_fig_ismale.csv")
    cfg.classification_read = "user_turn"
    [(_, cities), (_, figures)] = read_all_sources(cfg, resolve_data_dir(cfg), BadRecords())
    for records in (cities, figures):
        yes = np.mean([r.answer == "Yes" for r in records])
        assert 0.45 < yes < 0.55
        assert {r.question for r in records} == {YES_NO[records[0].label.split(":")[1]].question,
                                                 YES_NO[records[0].label.split(":")[1]].negated}


def test_read_last_reads_the_token_before_the_end_of_turn(smollm2_tok):
    r = Record(label="x", question="q", answer="a", dialog=(("user", "The capital of France is Paris"),),
               generation_prompt=False, read_last=1)
    [(tokens, positions)] = tokenize_reads(smollm2_tok, [read_text(smollm2_tok, r)])
    assert smollm2_tok.decode(tokens[positions]) == " Paris" and len(positions) == 1
    assert smollm2_tok.convert_ids_to_tokens(int(tokens[positions[0] + 1])) == "<|im_end|>"
    tokens3, positions3 = tokenize_read(smollm2_tok, [{"role": "user", "content": "The capital of France is Paris"}],
                                        generation_prompt=False, read_last=3)
    assert np.array_equal(tokens3, tokens) and positions3.tolist() == [positions[0] - 2, positions[0] - 1, positions[0]]
    # plain text: the last tokens of the read_chars span
    t, p = tokenize_read(smollm2_tok, "Paris is lovely. Rome too.", read_chars=(0, 16), read_last=1)
    assert smollm2_tok.decode(t[p]) == "."


def test_read_last_round_trips_through_jsonl_and_is_checked(tmp_path):
    r = Record(label="x", question="q", answer="a", dialog=(("user", "Hello there"),), generation_prompt=False,
               read_last=2)
    path = tmp_path / "r.jsonl"
    write_jsonl([r], str(path))
    assert json.loads(path.read_text())["read_last"] == 2
    [back] = read_jsonl(str(path), BadRecords())
    assert back.read_last == 2 and back.dialog == r.dialog
    path.write_text(json.dumps({"label": "x", "question": "q", "answer": "a", "text": "hi", "read_last": -1}) + "\n")
    bad = BadRecords("skip")
    assert read_jsonl(str(path), bad) == [] and bad.total == 1


def test_classification_read_setting_is_checked():
    cfg = default_data_config()
    cfg.classification_read = "sentence"
    with pytest.raises(ValueError, match="data.classification_read='sentence'"):
        check_data_config(cfg)


def test_per_source_record_caps():
    cfg = default_data_config()
    cfg.sources = ("latentqa/eval/system.json", "classification/gmt_cities.csv", "classification/gmt_sp_en_trans.csv")
    cfg.max_records_by_source = (("classification/gmt_c*", 50),)
    families = read_all_sources(cfg, resolve_data_dir(cfg), BadRecords())
    sizes = [len({r.index for r in records}) for _, records in families]
    assert sizes[0] == 567 and sizes[1] == 50 and sizes[2] > 300  # only the matching file is capped
    cfg.max_records_by_source = (("classification/*", -1),)
    with pytest.raises(ValueError, match="max_records_by_source"):
        check_data_config(cfg)
