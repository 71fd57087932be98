"""Sentence classification CSVs -> Records: yes/no or which-class questions about a sentence.

Read: the sentence as plain text (all of it). The label for the split is the dataset
("classification:gmt_cities"), so held-out datasets (their questions included) are
never seen in training. Each known file has a task spec: which column holds the text,
which the class, the question, and the answer for each class value. Any other CSV
with `statement,label` columns (label 1/0) is read as "Is this statement true?".
"""

from __future__ import annotations

import csv
import os
from typing import NamedTuple

from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.records import Record

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


def read_classification(path: str, bad: BadRecords, display: str | None = None) -> list[Record]:
    display = display or path
    name = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path):
        raise DataError(f"{display}: file not found")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{display}: empty file (no records)")
    task = TASKS.get(name, GENERIC)
    missing = [c for c in (task.text_column, task.class_column) if c not in rows[0]]
    if missing:
        raise DataError(f"{display}: no task spec for this file and no columns {missing}; known files: {sorted(TASKS)}")
    records = []
    for index, row in enumerate(rows):
        text, value = (row.get(task.text_column) or "").strip(), (row.get(task.class_column) or "").strip()
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
        records.append(Record(label=f"classification:{name}", question=task.question, answer=answer,
                              text=text, source=display, index=index))
    return records
