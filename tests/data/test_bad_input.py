"""Bad input: one clear error naming the file and record index, or a counted skip (on_bad_record='skip')."""

import json
import logging

import pytest

from lit_jax.data import DataError, build_splits, prepare_examples
from tests.data.conftest import memory_config

QA = {"persona-a": [["Who?", "A."], ["Why?", "Because."]], "persona-b": [["Who?", "B."], ["Why?", "So."]]}
GOOD = {"label": "persona-a", "system": "You are A.", "stimulus_user": "Hello there."}


def _data_dir(tmp_path, system_records=None, files=None):
    """A data dir with latentqa/eval/qa.json and the given system.json records / extra files."""
    (tmp_path / "latentqa/eval").mkdir(parents=True)
    (tmp_path / "latentqa/eval/qa.json").write_text(json.dumps(QA))
    if system_records is not None:
        (tmp_path / "latentqa/eval/system.json").write_text(json.dumps(system_records))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def _cfg(data_dir, sources=("latentqa/eval/system.json",), **kw):
    return memory_config(data_dir=data_dir, sources=sources, heldout_fraction=0.0, **kw)


def test_missing_field_names_file_and_record(tmp_path, smollm2_tok, caplog):
    d = _data_dir(tmp_path, [GOOD, {"label": "persona-b", "system": "You are B."}, GOOD])
    with pytest.raises(DataError, match=r"latentqa/eval/system.json: record 1: missing or empty field\(s\) "
                                        r"\['stimulus_user'\]"):
        prepare_examples(_cfg(d), smollm2_tok)
    with caplog.at_level(logging.WARNING, logger="lit_jax.data"):
        examples, meta = prepare_examples(_cfg(d, on_bad_record="skip"), smollm2_tok)
    assert len(examples["train"]) == 4 and meta["skipped"] == {"latentqa/eval/system.json": 1}
    assert "skipped 1 bad record(s) in latentqa/eval/system.json (first: latentqa/eval/system.json: record 1" in (
        caplog.text)


def test_label_without_qa(tmp_path, smollm2_tok):
    d = _data_dir(tmp_path, [GOOD, GOOD, {**GOOD, "label": "persona-zzz"}])
    with pytest.raises(DataError, match="system.json: record 2: label 'persona-zzz' has no QA pairs in "
                                        "latentqa/eval/qa.json"):
        prepare_examples(_cfg(d), smollm2_tok)
    examples, meta = prepare_examples(_cfg(d, on_bad_record="skip"), smollm2_tok)
    assert len(examples["train"]) == 4 and sum(meta["skipped"].values()) == 1


def test_dialog_longer_than_the_longest_bucket(tmp_path, smollm2_tok):
    long = {**GOOD, "stimulus_user": "word " * 300}
    d = _data_dir(tmp_path, [GOOD, long, GOOD])
    with pytest.raises(DataError, match=r"system.json: record 1: too long: read length R=3\d\d, read slots S=3\d\d, "
                                        r"decoder length T=\d+ exceed the longest bucket \(buckets \[\[64, 48, 128\]\]"):
        prepare_examples(_cfg(d, buckets=((64, 48, 128),)), smollm2_tok)
    with pytest.raises(DataError, match=r"record 1: too long: .* \(max_read_tokens=256, max_decoder_tokens=640\)"):
        prepare_examples(_cfg(d, max_read_tokens=256), smollm2_tok)
    examples, meta = prepare_examples(_cfg(d, max_read_tokens=256, on_bad_record="skip"), smollm2_tok)
    assert len(examples["train"]) == 4 and meta["skipped"] == {"latentqa/eval/system.json": 2}  # both QA pairs
    assert max(b[0] for b in meta["buckets"]) <= 256


@pytest.mark.parametrize("name", ["latentqa/eval/system.json", "mine.jsonl", "set.csv", "rel.json"])
def test_empty_file(tmp_path, smollm2_tok, name):
    d = _data_dir(tmp_path, files={name: "" if name != "rel.json" else "  \n"})
    with pytest.raises(DataError, match=f"{name}: empty file"):
        prepare_examples(_cfg(d, sources=(name,)), smollm2_tok)


def test_malformed_json_file(tmp_path, smollm2_tok):
    d = _data_dir(tmp_path, files={"latentqa/eval/control.json": '[{"label": "persona-a", "control_user": "x"},\n {'})
    with pytest.raises(DataError, match=r"latentqa/eval/control.json: malformed JSON \(.* at line 2, column"):
        prepare_examples(_cfg(d, sources=("latentqa/eval/control.json",)), smollm2_tok)


def test_malformed_jsonl_line_and_bad_records(tmp_path, smollm2_tok):
    good = {"label": "x", "question": "Q?", "answer": "A.", "text": "Some text."}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "dialog": [{"role": "user"}]}),
             json.dumps({"label": "x", "answer": "A.", "text": "t"}), json.dumps({**good, "questoin": "typo"}),
             json.dumps(good)]
    d = _data_dir(tmp_path, files={"mine.jsonl": "\n".join(lines) + "\n"})
    with pytest.raises(DataError, match=r"mine.jsonl: record 1: malformed JSON"):
        prepare_examples(_cfg(d, sources=("mine.jsonl",)), smollm2_tok)
    examples, meta = prepare_examples(_cfg(d, sources=("mine.jsonl",), on_bad_record="skip"), smollm2_tok)
    assert len(examples["train"]) == 2 and meta["skipped"] == {"mine.jsonl": 4}
    for i, msg in [(2, "'dialog' must be a list"), (3, r"missing field\(s\) \['question'\]"),
                   (4, r"unknown field\(s\) \['questoin'\]")]:
        (tmp_path / "one.jsonl").write_text(json.dumps(good) + "\n" + lines[i] + "\n")
        with pytest.raises(DataError, match=f"one.jsonl: record 1: {msg}"):
            prepare_examples(_cfg(d, sources=("one.jsonl",)), smollm2_tok)


def test_missing_data_dir_is_a_clear_error(tmp_path, smollm2_tok):
    with pytest.raises(DataError, match=r"data_dir .*nowhere' does not exist.*--config.data.data_dir"):
        build_splits(_cfg(str(tmp_path / "nowhere")), smollm2_tok)
