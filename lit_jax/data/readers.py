"""Data files -> Records, each file read by the reader its kind needs.

A file's kind: `.jsonl` = our record format (records.py); `.csv` = a classification set;
`.json` named control/stimulus/system/stimulus_completion = a LatentQA behaviour file
(joined with `latentqa_qa`); any other `.json` with `samples` + `prompt_templates` = a
relation. Records keep their file's display name (path relative to data_dir) and record
index. `read_all_sources` reads every file a config's `sources` names.

LatentQA: the read dialog and span per file kind (from the data README and the reference code):
  control              [user: control_user]                                   read from turn 0
  stimulus             [user: control_user, assistant: control_model,
                        user: stimulus_user]                                  read from turn 2
  system               [system: system, user: stimulus_user]                  read from turn 1
  stimulus_completion  stimulus + [assistant: stimulus_model] (teacher-forced) read from turn 2
All but stimulus_completion end with the generation header (the model is about to answer).
The kind is the file's name (control.json, stimulus.json, ...): explicit, and the fields
each kind needs are then checked per record. One Record per (behaviour record, QA pair
of its label).

Relations: read the relation's prompt template filled with the subject, as plain text (no
chat template: a sentence to be continued, e.g. "The capital city of Japan is"; the whole
text is read). Templates are used in turn (sample i gets template i mod n). Question:
`question_template` filled with the relation's range/domain/name ("Which city completes
the text?"); answer: the object. Label (what the split holds out): the relation
("relation:country capital city"), so held-out relations are never seen in training; or,
with label_by="relation_subject", each (relation, subject) pair, which holds out subjects
of relations seen in training.

Classification: the sentence is read as plain text (all of it); the label is the dataset
("classification:gmt_cities"), so held-out datasets are never seen in training. Each known
file has a task spec (text column, class column, question, answer per class value); any
other CSV with `statement,label` columns (label 1/0) is read as "Is this statement true?".
"""

from __future__ import annotations

import csv
import glob
import json
import os
import zlib
from typing import Any, NamedTuple

import numpy as np
from ml_collections import ConfigDict

from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.records import Record, read_jsonl

# ---------------------------------------------------------------- which files, which reader


def expand_sources(specs, data_dir: str) -> list[str]:
    """Absolute paths of the files named by `specs` (globs allowed), in order, without repeats."""
    paths: list[str] = []
    for spec in specs:
        matches = sorted(glob.glob(os.path.join(data_dir, os.path.expanduser(spec))))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"source {spec!r} matches no file under {data_dir}")
        paths += [os.path.abspath(m) for m in matches if os.path.abspath(m) not in paths]
    return paths


def display_name(path: str, data_dir: str) -> str:
    rel = os.path.relpath(path, data_dir)
    return path if rel.startswith("..") else rel


def family(path: str) -> str:
    """Which label namespace a file's labels live in (the split is made per family)."""
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".csv"):
        return "classification"
    return "latentqa" if latentqa_kind(path) else "relations"


def read_source(path: str, cfg: ConfigDict, bad: BadRecords, data_dir: str, qa: dict) -> list[Record]:
    """The Records of one file (qa: a cache holding the LatentQA QA table once loaded)."""
    display = display_name(path, data_dir)
    if path.endswith(".jsonl"):
        return read_jsonl(path, bad, display)
    if path.endswith(".csv"):
        return read_classification(path, bad, display, read=cfg.get("classification_read", "text"),
                                   tokens=int(cfg.get("classification_tokens", 1)))
    if not path.endswith(".json"):
        raise DataError(f"{display}: unknown source type (expected .jsonl, .csv or .json)")
    if latentqa_kind(path):
        if "table" not in qa:
            qa_path = os.path.join(data_dir, cfg.latentqa_qa)
            qa["table"] = load_qa(qa_path, display_name(qa_path, data_dir))
        return read_latentqa(path, qa["table"], bad, display, qa_display=cfg.latentqa_qa)
    if is_relation_file(load_json(path, display)):
        return read_relation(path, bad, question_template=cfg.relation_question, label_by=cfg.relations_label,
                             display=display)
    raise DataError(
        f"{display}: unknown JSON source (neither a LatentQA control/stimulus/system/stimulus_completion file "
        "nor a relation file with 'samples' and 'prompt_templates')"
    )


def limit_records(records: list[Record], max_records: int, seed: int, name: str) -> list[Record]:
    """At most `max_records` input records (file rows; all QA pairs of a kept row stay), seeded, in file order."""
    indices = sorted({r.index for r in records})
    if max_records <= 0 or len(indices) <= max_records:
        return records
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    keep = set(rng.choice(indices, size=max_records, replace=False).tolist())
    return [r for r in records if r.index in keep]


def record_limit(cfg: ConfigDict, name: str) -> int:
    """The record cap of the file `name` (relative to data_dir): the first (glob, n) of
    cfg.max_records_by_source whose glob matches it, else cfg.max_records_per_source (0: all).
    Lets a mixture cap big task files without shrinking the LatentQA ones."""
    import fnmatch

    for pattern, n in cfg.get("max_records_by_source", ()):
        if fnmatch.fnmatch(name, pattern):
            return int(n)
    return int(cfg.max_records_per_source)


def read_all_sources(cfg: ConfigDict, data_dir: str, bad: BadRecords) -> list[tuple[str, list[Record]]]:
    """[(family, records of one file)] for every configured file, in config order."""
    qa: dict[str, QA] = {}
    out = []
    for path in expand_sources(cfg.sources, data_dir):
        records = read_source(path, cfg, bad, data_dir, qa)
        name = display_name(path, data_dir)
        records = limit_records(records, record_limit(cfg, name), cfg.split_seed, name)
        out.append((family(path), records))
    return out


def load_json(path: str, display: str | None = None) -> Any:
    """Parsed JSON of `path`; DataError for a missing, empty or malformed file."""
    display = display or path
    if not os.path.isfile(path):
        raise DataError(f"{display}: file not found")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
        text = f.read()
    if not text.strip():
        raise DataError(f"{display}: empty file (no records)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{display}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, (list, dict)) and not data:
        raise DataError(f"{display}: empty file (no records)")
    return data


# ---------------------------------------------------------------- LatentQA behaviour files + qa.json

# kind -> (fields in dialog order with their roles, read_from_turn, generation_prompt)
KINDS: dict[str, tuple[tuple[tuple[str, str], ...], int, bool]] = {
    "control": ((("control_user", "user"),), 0, True),
    "stimulus": ((("control_user", "user"), ("control_model", "assistant"), ("stimulus_user", "user")), 2, True),
    "system": ((("system", "system"), ("stimulus_user", "user")), 1, True),
    "stimulus_completion": (
        (("control_user", "user"), ("control_model", "assistant"), ("stimulus_user", "user"),
         ("stimulus_model", "assistant")), 2, False),
}

QA = dict[str, list[tuple[str, str]]]


def latentqa_kind(path: str) -> str | None:
    """The LatentQA record kind of a behaviour file, from its name (None if not one)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if stem in KINDS else None


def load_qa(path: str, display: str | None = None) -> QA:
    """qa.json: {label: [[question, answer], ...]} with every pair checked."""
    display = display or path
    data = load_json(path, display)
    if not isinstance(data, dict):
        raise DataError(f"{display}: expected an object {{label: [[question, answer], ...]}}")
    qa: QA = {}
    for label, pairs in data.items():
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and s.strip() for s in p) for p in pairs
        ):
            raise DataError(f"{display}: label {label!r}: expected a list of [question, answer] string pairs")
        qa[label.strip()] = [(q.strip(), a.strip()) for q, a in pairs]
    return qa


def read_latentqa(path: str, qa: QA, bad: BadRecords, display: str | None = None, qa_display: str = "qa.json"
                  ) -> list[Record]:
    """Records of one behaviour file: one per (behaviour record, QA pair of its label)."""
    display = display or path
    kind = latentqa_kind(path)
    if kind is None:
        raise DataError(f"{display}: not a LatentQA behaviour file (expected one of {sorted(KINDS)}.json)")
    fields, read_from, gen = KINDS[kind]
    data = load_json(path, display)
    if not isinstance(data, list):
        raise DataError(f"{display}: expected a list of records")
    records = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            bad.report(display, index, f"expected an object, got {type(item).__name__}")
            continue
        missing = [f for f in ("label", *(f for f, _ in fields)) if not _nonempty(item.get(f))]
        if missing:
            bad.report(display, index, f"missing or empty field(s) {missing} (a {kind} record needs them)")
            continue
        label = item["label"].strip()
        if not qa.get(label):
            bad.report(display, index, f"label {label!r} has no QA pairs in {qa_display}")
            continue
        dialog = tuple((role, item[f].strip()) for f, role in fields)
        for question, answer in qa[label]:
            records.append(Record(label=label, question=question, answer=answer, dialog=dialog,
                                  read_from_turn=read_from, generation_prompt=gen, source=display, index=index))
    return records


def _nonempty(v: object) -> bool:
    return isinstance(v, str) and bool(v.strip())


# ---------------------------------------------------------------- relational knowledge

LABEL_BY = ("relation", "relation_subject")


def is_relation_file(data: object) -> bool:
    return isinstance(data, dict) and "samples" in data and "prompt_templates" in data


def read_relation(path: str, bad: BadRecords, *, question_template: str, label_by: str = "relation",
                  display: str | None = None) -> list[Record]:
    display = display or path
    if label_by not in LABEL_BY:
        raise ValueError(f"relations_label={label_by!r}; expected one of {LABEL_BY}")
    data = load_json(path, display)
    if not is_relation_file(data):
        raise DataError(f"{display}: not a relation file (needs 'name', 'prompt_templates', 'properties', 'samples')")
    name = data.get("name")
    templates = data.get("prompt_templates")
    props = data.get("properties") or {}
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{display}: missing field 'name'")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise DataError(f"{display}: 'prompt_templates' must be a non-empty list of strings with a '{{}}' slot")
    if not isinstance(data["samples"], list) or not data["samples"]:
        raise DataError(f"{display}: empty file (no samples)")
    question = question_template.format(range=props.get("range_name", "answer"),
                                         domain=props.get("domain_name", "subject"), relation=name)
    records = []
    for index, sample in enumerate(data["samples"]):
        if not isinstance(sample, dict):
            bad.report(display, index, "sample is not an object")
            continue
        missing = [k for k in ("subject", "object") if not (isinstance(sample.get(k), str) and sample[k].strip())]
        if missing:
            bad.report(display, index, f"missing or empty field(s) {missing}")
            continue
        subject, obj = sample["subject"].strip(), sample["object"].strip()
        label = f"relation:{name}" + (f"/{subject}" if label_by == "relation_subject" else "")
        text = templates[index % len(templates)].replace("{}", subject)
        records.append(Record(label=label, question=question, answer=obj, text=text, source=display, index=index))
    return records


# ---------------------------------------------------------------- sentence classification CSVs

YES_NO_10 = {"1": "Yes", "0": "No"}
YES_NO_TF = {"True": "Yes", "False": "No"}
TRUE = "Is this statement true?"


class Task(NamedTuple):
    text_column: str
    class_column: str
    question: str
    answers: dict[str, str] | None  # None: the class value itself, capitalised ("Past perfect.")


TASKS: dict[str, Task] = {
    "engels_21_headline_istrump": Task("prompt", "target", "Is this headline about Donald Trump?", YES_NO_TF),
    "engels_22_headline_isobama": Task("prompt", "target", "Is this headline about Barack Obama?", YES_NO_TF),
    "engels_23_headline_ischina": Task("prompt", "target", "Is this headline about China?", YES_NO_TF),
    "engels_5_hist_fig_ismale": Task("prompt", "target", "Is this historical figure a man?", YES_NO_10),
    "gmt_cities": Task("statement", "label", TRUE, YES_NO_10),
    "gmt_companies_true_false": Task("statement", "label", TRUE, YES_NO_10),
    "gmt_larger_than": Task("statement", "label", TRUE, YES_NO_10),
    "gmt_smaller_than": Task("statement", "label", TRUE, YES_NO_10),
    "gmt_sp_en_trans": Task("statement", "label", TRUE, YES_NO_10),
    "singular_plural_singular_plural": Task(
        "sentence", "n_subjects", "Does the sentence have a single subject or multiple subjects?",
        {"single": "A single subject.", "multiple": "Multiple subjects."}),
    "tense_tense": Task("sentence", "tense", "What is the tense of the sentence?", None),
}
GENERIC = Task("statement", "label", TRUE, YES_NO_10)


class YesNo(NamedTuple):
    """A dataset as yes/no questions (the Activation Oracles protocol): `question` is answered Yes
    for the class values in `positive`, `negated` is answered Yes for the others."""

    question: str
    negated: str
    positive: frozenset


_TRUE_FALSE = YesNo(TRUE, "Is this statement false?", frozenset({"1"}))
YES_NO: dict[str, YesNo] = {
    "engels_21_headline_istrump": YesNo("Is this headline about Donald Trump?",
                                        "Is this headline not about Donald Trump?", frozenset({"True"})),
    "engels_22_headline_isobama": YesNo("Is this headline about Barack Obama?",
                                        "Is this headline not about Barack Obama?", frozenset({"True"})),
    "engels_23_headline_ischina": YesNo("Is this headline about China?", "Is this headline not about China?",
                                        frozenset({"True"})),
    "engels_5_hist_fig_ismale": YesNo("Is this historical figure a man?", "Is this historical figure a woman?",
                                      frozenset({"1"})),
    "gmt_cities": _TRUE_FALSE,
    "gmt_companies_true_false": _TRUE_FALSE,
    "gmt_larger_than": _TRUE_FALSE,
    "gmt_smaller_than": _TRUE_FALSE,
    "gmt_sp_en_trans": _TRUE_FALSE,
    "singular_plural_singular_plural": YesNo("Does the sentence have a single subject?",
                                             "Does the sentence have multiple subjects?", frozenset({"single"})),
}
CLASSIFICATION_READS = ("text", "user_turn")


def yes_no_answer(yes_no: YesNo, value: str, negated: bool) -> str:
    """The right answer ("Yes"/"No") to the question (or its negation) for a sentence of class `value`."""
    return "Yes" if (value in yes_no.positive) != negated else "No"


def read_classification(path: str, bad: BadRecords, display: str | None = None, *, read: str = "text",
                        tokens: int = 1) -> list[Record]:
    """Records of a classification CSV. read="text": the sentence as plain text, all of it read,
    the task's question (TASKS). read="user_turn" (the Activation Oracles protocol): the sentence
    as one user turn, only its last `tokens` tokens read (Record.read_last: ending at the token
    before the end of turn); for a dataset in YES_NO, half the records (by a hash of the sentence)
    ask the negated question, so Yes and No answers balance whatever the class balance."""
    display = display or path
    if read not in CLASSIFICATION_READS:
        raise ValueError(f"classification read={read!r}; expected one of {CLASSIFICATION_READS}")
    name = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path):
        raise DataError(f"{display}: file not found")
    # utf-8-sig drops a byte-order mark (spreadsheet programs write one; it would otherwise be
    # part of the first column's name); newline="" lets csv handle CRLF and quoted newlines.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{display}: empty file (no records)")
    task = TASKS.get(name, GENERIC)
    missing = [c for c in (task.text_column, task.class_column) if c not in rows[0]]
    if missing:
        raise DataError(f"{display}: no task spec for this file and no columns {missing}; known files: {sorted(TASKS)}")
    records = []
    for index, row in enumerate(rows):
        # A quoted multi-line cell keeps the file's line ending: CRLF files read like LF ones.
        text, value = ((row.get(c) or "").replace("\r\n", "\n").strip() for c in (task.text_column, task.class_column))
        if not text:
            bad.report(display, index, f"empty {task.text_column!r}")
            continue
        if task.answers is None:
            answer = f"{value[:1].upper()}{value[1:]}." if value else ""
        else:
            answer = task.answers.get(value, "")
        if not answer:
            allowed = "non-empty" if task.answers is None else f"one of {sorted(task.answers)}"
            bad.report(display, index, f"{task.class_column}={value!r} is not {allowed}")
            continue
        label, question = f"classification:{name}", task.question
        if read == "text":
            records.append(Record(label=label, question=question, answer=answer, text=text, source=display,
                                  index=index))
            continue
        if name in YES_NO:
            negated = zlib.crc32(text.encode()) % 2 == 1  # not the row's parity: files often alternate classes
            question = YES_NO[name].negated if negated else YES_NO[name].question
            answer = yes_no_answer(YES_NO[name], value, negated)
        records.append(Record(label=label, question=question, answer=answer, dialog=(("user", text),),
                              generation_prompt=False, read_last=tokens, source=display, index=index))
    return records
