"""Relational knowledge -> Records: read a prompt about the subject, ask for the object.

Read: the relation's prompt template filled with the subject, as plain text (no chat
template: it is a sentence to be continued, e.g. "The capital city of Japan is"; the
whole text is read). Templates are used in turn (sample i gets template i mod n).
Question: `question_template` filled with the relation's range/domain/name, e.g.
"Which city completes the text?". Answer: the object.
Label (what the split holds out): the relation ("relation:country capital city"), so
held-out relations are never seen in training; or, with label_by="relation_subject",
each (relation, subject) pair, which holds out subjects of relations seen in training.
"""

from __future__ import annotations

from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.jsonfile import load_json
from lit_jax.data.records import Record

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
