"""Records from every source kind, our JSONL format, and the split by label."""

import csv
import glob
import json
import os

import pytest

from lit_jax.data import LATENTQA_CORPUS, Record, default_data_config, read_jsonl, write_jsonl
from lit_jax.data.config import CLASSIFICATION, RELATIONS, resolve_data_dir
from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.pipeline import split_by_label
from lit_jax.data.readers import read_all_sources

DATA = resolve_data_dir(default_data_config())


def _load(rel):
    with open(os.path.join(DATA, rel), encoding="utf-8") as f:
        return json.load(f)


QA = _load("latentqa/eval/qa.json")


def _records(sources, **overrides):
    cfg = default_data_config()
    cfg.sources = sources
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, read_all_sources(cfg, DATA, BadRecords("error"))


def test_latentqa_files_join_qa_and_keep_their_dialog_shapes():
    _, fams = _records(LATENTQA_CORPUS)
    by_file = {recs[0].source: recs for _, recs in fams}
    raw = {f: _load(f) for f in LATENTQA_CORPUS}
    assert sorted(by_file) == sorted(LATENTQA_CORPUS)
    for f, recs in by_file.items():
        assert len(recs) == sum(len(QA[item["label"]]) for item in raw[f])  # one record per QA pair of its label
        r = recs[2]
        item = raw[f][r.index]
        assert r.label == item["label"] and (r.question, r.answer) in [tuple(p) for p in QA[r.label]]
    control, stimulus, system, _, completion = (by_file[f][0] for f in LATENTQA_CORPUS)
    assert control.dialog == (("user", raw[LATENTQA_CORPUS[0]][0]["control_user"]),) and control.read_from_turn == 0
    assert [t[0] for t in stimulus.dialog] == ["user", "assistant", "user"] and stimulus.read_from_turn == 2
    assert stimulus.generation_prompt
    assert [t[0] for t in system.dialog] == ["system", "user"] and system.read_from_turn == 1
    assert [t[0] for t in completion.dialog] == ["user", "assistant", "user", "assistant"]
    assert completion.read_from_turn == 2 and not completion.generation_prompt


def test_relation_and_classification_tasks():
    _, fams = _records(("relations/factual/country_capital_city.json", "classification/gmt_cities.csv",
                        "classification/tense_tense.csv"))
    (f1, rel), (f2, cities), (_, tense) = fams
    assert (f1, f2) == ("relations", "classification")
    r = rel[0]
    assert r.text == "The capital city of United States is" and r.answer == "Washington D.C."
    assert r.question == "Which city completes the text?" and r.label == "relation:country capital city"
    assert rel[1].text.startswith("The capital of ")  # templates used in turn
    assert cities[0].text == "The city of Krasnodar is in Russia." and cities[0].answer == "Yes"
    assert cities[1].answer == "No" and cities[0].question == "Is this statement true?"
    assert {r.label for r in cities} == {"classification:gmt_cities"}
    assert tense[0].text == "I am eating breakfast" and tense[0].answer == "Present."
    _, [(_, by_subject)] = _records(("relations/factual/country_capital_city.json",),
                                    relations_label="relation_subject")
    assert by_subject[0].label == "relation:country capital city/United States"


def test_all_relation_and_classification_files_read():
    _, fams = _records(RELATIONS + CLASSIFICATION)
    expected = {}  # file -> its samples / rows (the data is clean: a bad one would raise)
    for path in glob.glob(os.path.join(DATA, "relations", "*", "*.json")):
        expected[os.path.relpath(path, DATA)] = len(_load(path)["samples"])
    for path in glob.glob(os.path.join(DATA, "classification", "*.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            expected[os.path.relpath(path, DATA)] = len(list(csv.DictReader(f)))
    assert len(expected) > 2 and all(expected.values())
    assert {recs[0].source: len(recs) for _, recs in fams} == expected


def test_max_records_per_source_is_a_seeded_subset_keeping_all_qa_pairs():
    _, fams = _records(("latentqa/eval/system.json",), max_records_per_source=7)
    recs = fams[0][1]
    raw = _load("latentqa/eval/system.json")
    kept = {r.index for r in recs}
    assert len(kept) == 7 and len(recs) == sum(len(QA[raw[i]["label"]]) for i in kept)
    assert [r.index for r in recs] == sorted(r.index for r in recs)
    _, again = _records(("latentqa/eval/system.json",), max_records_per_source=7)
    _, other = _records(("latentqa/eval/system.json",), max_records_per_source=7, split_seed=1)
    assert again[0][1] == recs and other[0][1] != recs


def test_jsonl_round_trip_and_spec(tmp_path):
    recs = [
        Record(label="persona-pirate", question="Who?", answer="A pirate.",
               dialog=(("system", "You are a pirate."), ("user", "Hi!")), read_from_turn=1),
        Record(label="rel", question="Which city?", answer="Paris", text="The capital of France is",
               read_chars=(4, 24), generation_prompt=False),
    ]
    path = tmp_path / "mine.jsonl"
    assert write_jsonl(recs, str(path)) == 2
    back = read_jsonl(str(path), BadRecords("error"))
    assert [(r.label, r.dialog, r.read_from_turn, r.generation_prompt, r.text, r.read_chars) for r in back] == [
        (r.label, r.dialog, r.read_from_turn, r.dialog is not None, r.text, r.read_chars) for r in recs]
    assert back[1].source == str(path) and back[1].index == 1


def test_split_has_no_label_overlap_is_stable_and_seeded():
    cfg, fams = _records(LATENTQA_CORPUS + ("relations/*/*.json", "classification/*.csv"),
                         max_records_per_source=40)
    a = split_by_label(fams, 0.2, seed=0)
    train, held = {r.label for r in a["train"]}, {r.label for r in a["heldout"]}
    assert train and held and not train & held
    assert len(a["train"]) + len(a["heldout"]) == sum(len(r) for _, r in fams)
    for prefix in ("persona-", "goal-", "relation:", "classification:"):  # every family is held out from
        assert any(lab.startswith(prefix) for lab in held)
    assert split_by_label(fams, 0.2, seed=0) == a
    b = split_by_label(fams, 0.2, seed=1)
    assert {r.label for r in b["heldout"]} != held


def test_a_label_is_held_out_in_every_file_it_occurs_in():
    files = ("latentqa/eval/stimulus.json", "latentqa/eval/system.json")
    _, fams = _records(files)
    raw = {f: _load(f) for f in files}
    labels = {item["label"] for f in files for item in raw[f]}
    split = split_by_label(fams, 0.1, seed=0)
    held = {r.label for r in split["heldout"]}
    assert len(held) == round(0.1 * len(labels))
    assert {r.source for r in split["heldout"]} == set(files)
    for lab in sorted(held)[:20]:  # every record of the label, in both files, once per QA pair
        where = [f for f in files for item in raw[f] if item["label"] == lab]
        got = [r for r in split["heldout"] if r.label == lab]
        assert set(where) == {r.source for r in got} == set(files)
        assert len(got) == len(where) * len(QA[lab])


def test_unknown_source_kinds_fail_clearly(tmp_path):
    cfg = default_data_config()
    cfg.sources = (str(tmp_path / "nothing*.json"),)
    with pytest.raises(DataError, match="matches no file"):
        read_all_sources(cfg, DATA, BadRecords())
    (tmp_path / "odd.json").write_text('{"a": 1}')
    cfg.sources = (str(tmp_path / "odd.json"),)
    with pytest.raises(DataError, match="odd.json: unknown JSON source"):
        read_all_sources(cfg, DATA, BadRecords())


def test_readme_jsonl_example_is_valid(tmp_path, smollm2_tok):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    block = readme.split("**Bring your own data**", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    lines = [json.dumps(json.loads(line)) for line in block.replace("\n ", " ").strip().splitlines()]
    path = tmp_path / "readme.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pirate, capital = read_jsonl(str(path), BadRecords("error"))
    assert pirate.read_from_turn == 1 and pirate.generation_prompt and capital.read_chars == (0, 23)
    from lit_jax.data import tokenize_read

    tokens, positions = tokenize_read(smollm2_tok, capital.text, read_chars=capital.read_chars)
    assert len(positions) == len(tokens)
