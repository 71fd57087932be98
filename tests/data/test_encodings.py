"""Every data format loads the same with or without a UTF-8 byte-order mark and with CRLF line endings
(issue 12, fault 8: a BOM made the first CSV column '\\ufeffstatement', refused as missing)."""

import dataclasses
import json

import pytest

from lit_jax.data.errors import BadRecords
from lit_jax.data.readers import load_qa, read_classification, read_latentqa, read_relation
from lit_jax.data.records import read_jsonl

BOM = "\ufeff"


def _variants(tmp_path, name, text):
    """(kind, path) for the plain file and its BOM, CRLF and BOM+CRLF copies (same file name, own dir)."""
    out = []
    for kind, bom, crlf in (("plain", False, False), ("bom", True, False), ("crlf", False, True),
                            ("bom_crlf", True, True)):
        body = text.replace("\n", "\r\n") if crlf else text
        d = tmp_path / kind
        d.mkdir(exist_ok=True)
        path = d / name
        path.write_bytes(((BOM if bom else "") + body).encode("utf-8"))
        out.append((kind, str(path)))
    return out


def _strip_source(records):
    return [dataclasses.replace(r, source="") for r in records]


def _same(records_by_kind):
    plain = _strip_source(records_by_kind["plain"])
    assert plain, "the plain file gave no records"
    for kind, recs in records_by_kind.items():
        assert _strip_source(recs) == plain, kind
    return plain


CSV = 'statement,label\nThe sky is blue.,1\n"Two\nlines.",0\nParis is in Spain.,0\n'


def test_csv_bom_and_crlf(tmp_path):
    got = {kind: read_classification(p, BadRecords(), display="x.csv") for kind, p in _variants(tmp_path, "x.csv", CSV)}
    plain = _same(got)
    assert [r.text for r in plain] == ["The sky is blue.", "Two\nlines.", "Paris is in Spain."]
    assert [r.answer for r in plain] == ["Yes", "No", "No"]


def test_csv_known_task_with_bom(tmp_path):
    text = "prompt,target\nObama wins.,False\n"
    got = {kind: read_classification(p, BadRecords(), display="t.csv")
           for kind, p in _variants(tmp_path, "engels_21_headline_istrump.csv", text)}
    assert [r.answer for r in _same(got)] == ["No"]


def test_jsonl_bom_and_crlf(tmp_path):
    lines = [{"label": "a", "question": "Who?", "answer": "A.", "dialog": [{"role": "user", "content": "Hi."}]},
             {"label": "b", "question": "What?", "answer": "B.", "text": "Some text."}]
    text = "".join(json.dumps(x) + "\n" for x in lines) + "\n"
    got = {kind: read_jsonl(p, BadRecords(), display="r.jsonl") for kind, p in _variants(tmp_path, "r.jsonl", text)}
    plain = _same(got)
    assert [r.label for r in plain] == ["a", "b"] and [r.index for r in plain] == [0, 1]


def test_latentqa_and_qa_bom_and_crlf(tmp_path):
    qa_text = json.dumps({"persona-a": [["Who?", "A."], ["Why?", "Because."]]}, indent=2) + "\n"
    sys_text = json.dumps([{"label": "persona-a", "system": "You are A.", "stimulus_user": "Hello."}], indent=2) + "\n"
    qa_paths = dict(_variants(tmp_path, "qa.json", qa_text))
    qas = {kind: load_qa(p) for kind, p in qa_paths.items()}
    assert all(q == qas["plain"] for q in qas.values())
    got = {kind: read_latentqa(p, qas[kind], BadRecords(), display="system.json")
           for kind, p in _variants(tmp_path, "system.json", sys_text)}
    plain = _same(got)
    assert len(plain) == 2 and plain[0].dialog == (("system", "You are A."), ("user", "Hello."))


def test_relation_bom_and_crlf(tmp_path):
    rel = {"name": "capital", "prompt_templates": ["The capital of {} is"], "properties": {},
           "samples": [{"subject": "France", "object": "Paris"}]}
    text = json.dumps(rel, indent=2) + "\n"
    got = {kind: read_relation(p, BadRecords(), question_template="What is the {relation}?", display="r.json")
           for kind, p in _variants(tmp_path, "r.json", text)}
    plain = _same(got)
    assert plain[0].text == "The capital of France is" and plain[0].answer == "Paris"


@pytest.mark.parametrize("name", ["x.csv", "r.jsonl", "qa.json"])
def test_bom_only_file_is_empty(tmp_path, name):
    from lit_jax.data import DataError

    p = tmp_path / name
    p.write_bytes(BOM.encode("utf-8") + b"\r\n")
    with pytest.raises(DataError, match="empty"):
        {"x.csv": lambda: read_classification(str(p), BadRecords()), "r.jsonl": lambda: read_jsonl(str(p), BadRecords()),
         "qa.json": lambda: load_qa(str(p))}[name]()
